"""External folders built in code for the tests (diffusers' `get_dummy_components` style): tiny
StableDiffusionPipeline, StableDiffusion3Pipeline and FluxPipeline folders, LoRA adapters of
their parts saved by peft and by diffusers, images with member lists, a CLIP folder, the audit's
command line."""

import csv
import json
from pathlib import Path

import diffusers
import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPModel, CLIPTextConfig, CLIPTextModel

from lightning_mia.data.images import tensor_to_pil
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.encoder import ImageTextEncoder, clip_config
from lightning_mia.models.flow_arch import ARCHITECTURES
from lightning_mia.models.flow_presets import (
    FlowSpec,
    build_text_encoders,
    build_transformer,
    flux_tiny,
)
from lightning_mia.models.flow_presets import tiny as tiny_flow
from lightning_mia.models.lora import LORA_WEIGHTS
from lightning_mia.models.pipeline_folder import pipeline_layout
from lightning_mia.models.tokenizers import char_clip_tokenizer

RES = 16  # pixels; the tiny VAE halves once: 8x8x4 latents


def tiny_vae() -> AutoencoderKL:
    """A random f2 KL autoencoder (16x16 pixels -> 8x8x4 latents)."""
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=RES,
    )


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
    vae = tiny_vae()
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


def tiny_flow_spec(tokenizer) -> FlowSpec:
    """The flow presets' view of the tiny VAE's latents (8x8x4) and the tokenizer."""
    return FlowSpec(
        latent_channels=4,
        latent_size=RES // 2,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_tiny_flux_pipeline(folder, seed=0) -> Path:
    """Write a tiny FluxPipeline folder: the flow family's `flux-tiny` preset over the tiny
    VAE at RES pixels, random weights (`seed`); its T5 reads the character-level tokenizer."""
    from diffusers import FluxPipeline

    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(77)
    preset = flux_tiny(tiny_flow_spec(tokenizer))
    flux = ARCHITECTURES["flux"]
    clip, t5, _, _ = flux.build_text(preset)
    pipe = FluxPipeline(
        transformer=flux.build_transformer(preset),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_vae(),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer,
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def save_tiny_sd3_pipeline(folder, seed=0, shift=3.0) -> Path:
    """Write a tiny StableDiffusion3Pipeline folder (no T5): the flow family's `tiny` preset
    over the tiny VAE at RES pixels, random weights (`seed`)."""
    torch.manual_seed(seed)
    tokenizer = char_clip_tokenizer(77)
    preset = tiny_flow(tiny_flow_spec(tokenizer))
    clip, clip_2 = build_text_encoders(preset)
    pipe = StableDiffusion3Pipeline(
        transformer=build_transformer(preset),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=tiny_vae(),
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=clip_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(str(folder))
    return Path(folder)


def load_part(pipeline, part) -> torch.nn.Module:
    """`<pipeline>/<part>` as the class its layout names (UNet, SD3 transformer, CLIP...)."""
    name = pipeline_layout(pipeline).part_classes[part]
    cls = getattr(diffusers, name, None) or getattr(transformers, name)
    return cls.from_pretrained(str(pipeline), subfolder=part)


def randomize_lora_b(model, std=0.2) -> None:
    """Non-zero LoRA B weights (peft starts them at zero): an adapter that changes the model."""
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)


def save_peft_adapter(
    folder, pipeline, rank=2, alpha=4.0, targets=("to_q", "to_v"), seed=1, part="unet"
):
    """A LoRA adapter of the pipeline's `part` (its UNet, or an SD3 folder's transformer) as
    peft's `PeftModel.save_pretrained` writes it (adapter_config.json +
    adapter_model.safetensors), with non-zero weights so that it changes the model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
    model = get_peft_model(load_part(pipeline, part), config)
    randomize_lora_b(model)
    model.save_pretrained(str(folder))
    return Path(folder)


def save_diffusers_lora(
    folder, pipeline, parts=("transformer",), rank=2, alpha=4.0, targets=("to_q", "to_v"), seed=1
) -> Path:
    """A LoRA of the pipeline's `parts` as diffusers' training scripts write it
    (`save_lora_weights`: pytorch_lora_weights.safetensors, the peft configs as metadata), with
    non-zero weights. Returns the .safetensors file."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    pipeline_class = getattr(diffusers, pipeline_layout(pipeline).pipeline_class)
    layers = {}
    for part in parts:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets))
        model = inject_adapter_in_model(config, load_part(pipeline, part))
        randomize_lora_b(model)
        state = get_peft_model_state_dict(model)
        if pipeline_class is StableDiffusionPipeline:  # SD LoRAs use diffusers' key names
            state = convert_state_dict_to_diffusers(state)
        layers[f"{part}_lora_layers"] = state
        layers[f"{part}_lora_adapter_metadata"] = config.to_dict()
    pipeline_class.save_lora_weights(str(folder), **layers, weight_name=LORA_WEIGHTS)
    return Path(folder) / LORA_WEIGHTS


def other_transformer_lora(folder) -> Path:
    """A diffusers-format LoRA of an SD3 transformer of another width (heads 2 x 8)."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(0)
    other = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=64,
        caption_projection_dim=16,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=8,
    )
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["to_q", "to_v"]), other)
    layers = get_peft_model_state_dict(other)
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=layers)
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


def save_member_lists(root, n, seed=5) -> tuple[Path, Path]:
    """2n shapes images in `root/images/` and the lists an auditor is handed: the first n as
    members (jsonl), the other n as non-members (csv)."""
    root = Path(root)
    source = ShapesSource(num_samples=2 * n, resolution=RES, seed=seed)
    (root / "images").mkdir()
    rows = []
    for i in source.sample_ids():
        tensor_to_pil(source.image(i)).save(root / "images" / f"{i:03d}.png")
        rows.append({"file_name": f"images/{i:03d}.png", "text": source.caption(i)})
    members = write_member_list(root / "members.jsonl", rows[:n])
    return members, write_member_list(root / "non_members.csv", rows[n:])


def save_tiny_clip(folder) -> Path:
    """A random tiny CLIP folder: it stands for the attacker's pretrained CLIP."""
    tokenizer = char_clip_tokenizer(128)
    clip = CLIPModel(clip_config("tiny", tokenizer))
    return ImageTextEncoder(clip, tokenizer).save(folder)


def audit_options(inputs, experiment, num_shadows: int = 1, **external):
    """The `AttackOptions` of an external audit of `inputs` (as `audit_args`), `external`
    fields put in."""
    from lightning_mia.attack.options import AttackOptions, ExternalTarget
    from lightning_mia.specs.query import QuerySpec

    fields = dict(
        pipeline=str(inputs["pipeline"]),
        members=str(inputs["members"]),
        non_members=str(inputs["non_members"]),
        num_shadows=num_shadows,
        shadow_config=str(inputs["config"]),
    )
    return AttackOptions(
        experiment=str(experiment),
        external=ExternalTarget(**{**fields, **external}),
        query=QuerySpec(encoder=str(inputs["clip"])),
    )


def audit_args(inputs, experiment, *extra) -> list[str]:
    """`attack.py` arguments of an external audit of `inputs` (pipeline, members,
    non_members, config, clip) with one shadow."""
    return [
        "--external.pipeline",
        str(inputs["pipeline"]),
        "--external.members",
        str(inputs["members"]),
        "--external.non_members",
        str(inputs["non_members"]),
        "--experiment",
        str(experiment),
        "--external.shadow_config",
        str(inputs["config"]),
        "--external.num_shadows",
        "1",
        "--query.encoder",
        str(inputs["clip"]),
        *extra,
    ]


def tiny_shadow_config(class_path) -> dict:
    """The shadows' train.py config of an audit's tests: 3 CPU steps of `class_path` (the
    audit puts in the base, the LoRA settings and the data)."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 3,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {
            "class_path": class_path,
            "init_args": {
                "resolution": 0,
                "num_inference_steps": 2,
                "guidance_scale": 2.0,
                "lr": 0.01,
                "caption_dropout": 0.0,
            },
        },
        "data": {"batch_size": 8},
    }
