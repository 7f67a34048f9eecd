"""External folders built in code for the tests (diffusers' `get_dummy_components` style): a tiny
StableDiffusionPipeline folder, LoRA adapters saved by peft and by diffusers, member lists."""

import csv
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from lightning_mia.models.tokenizers import char_clip_tokenizer

RES = 16  # pixels; the tiny VAE halves once: 8x8x4 latents


def tiny_parts(seed: int = 0, prediction_type: str = "epsilon") -> dict:
    """The five parts of a StableDiffusionPipeline at tiny sizes (random weights, `seed`)."""
    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(77)  # offline, every caption round-trips
    unet = UNet2DConditionModel(
        sample_size=RES // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RES,
    )
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    scheduler = DDIMScheduler(  # Stable Diffusion's schedule
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return dict(
        unet=unet,
        vae=vae,
        text_encoder=CLIPTextModel(text),
        tokenizer=tokenizer,
        scheduler=scheduler,
    )


def save_tiny_pipeline(folder, seed=0, prediction_type="epsilon", variant=None) -> Path:
    """Write a tiny StableDiffusionPipeline folder (fp16 files only with variant="fp16")."""
    pipe = StableDiffusionPipeline(
        **tiny_parts(seed, prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if variant == "fp16":
        pipe.unet.half(), pipe.vae.half(), pipe.text_encoder.half()
    pipe.save_pretrained(str(folder), variant=variant)
    return Path(folder)


def save_peft_adapter(folder, pipeline, rank=2, alpha=4.0, targets=("to_q", "to_v"), seed=1):
    """A UNet LoRA adapter as peft's `PeftModel.save_pretrained` writes it (adapter_config.json
    + adapter_model.safetensors), with non-zero weights so that it changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(str(pipeline), subfolder="unet")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
    model = get_peft_model(unet, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    model.save_pretrained(str(folder))
    return Path(folder)


def write_member_list(path, rows) -> Path:
    """rows: dicts (file_name/text/id ...) -> a .jsonl or .csv file, by the suffix."""
    path = Path(path)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path
