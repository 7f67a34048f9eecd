"""Named sizes of the latent diffusion family: `PRESETS[name](spec) -> PresetConfig`.

A preset gives the configs of the two trained components (UNet, CLIP text encoder) for a given
latent space and vocabulary; the autoencoder and tokenizer come from their folders.

- `tiny`: 32x32 images, random init, ~1-2 M parameters: trains on a laptop CPU in minutes.
- `ldm-256`: CompVis text-to-image LDM class at 256x256 (UNet 320-640-1280-1280, a 12-layer
  768-wide text encoder), random init, trained from scratch on GPUs.
- `pretrained`: the configs of a local diffusers folder (StableDiffusionPipeline layout:
  unet/, vae/, text_encoder/, tokenizer/, scheduler/); its weights are loaded to fine-tune
  (fp16-variant files too, into float32), and `noise_scheduler` takes its noise schedule and
  prediction type from the folder's scheduler/scheduler_config.json.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from lightning.pytorch.utilities import rank_zero_warn
from transformers import CLIPTextConfig, CLIPTextModel

from lightning_mia.models.pipeline_folder import (
    check_pipeline_folder,
    part_config,
    scheduler_config,
    weights_variant,
)
from lightning_mia.registry import Registry

# the noise schedule of the presets trained from scratch (v-prediction on the cosine schedule:
# eps + linear gave no usable samples on the tiny model, see FINDINGS.md)
SCRATCH_SCHEDULE = {
    "prediction_type": "v_prediction",
    "beta_schedule": "squaredcos_cap_v2",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "num_train_timesteps": 1000,
}
COMMON_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "PNDMScheduler",
    "UniPCMultistepScheduler",
)


@dataclass(frozen=True)
class LatentSpec:
    """What a preset needs to know: the latent space, the vocabulary, an optional folder."""

    latent_channels: int
    latent_size: int
    vocab_size: int
    max_length: int = 77
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 1
    pretrained: str = ""


@dataclass(frozen=True)
class PresetConfig:
    """Configs of the trained components (`UNet2DConditionModel`, `CLIPTextConfig` kwargs)."""

    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    pretrained: str = ""  # folder whose weights to load ("" = random init)


def _text_config(spec: LatentSpec, hidden: int, layers: int, heads: int) -> dict[str, Any]:
    return dict(
        vocab_size=spec.vocab_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=spec.max_length,
        bos_token_id=spec.bos_token_id,
        eos_token_id=spec.eos_token_id,
        pad_token_id=spec.pad_token_id,
        projection_dim=hidden,
    )


def _unet_config(
    spec: LatentSpec, channels: tuple[int, ...], cross_dim: int, **extra: Any
) -> dict[str, Any]:
    down = ["CrossAttnDownBlock2D"] * (len(channels) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(channels) - 1)
    return dict(
        sample_size=spec.latent_size,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        block_out_channels=tuple(channels),
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=cross_dim,
        **extra,
    )


def tiny(spec: LatentSpec) -> PresetConfig:
    """32x32 pixels (8x8 latents with the tiny f4 autoencoder); ~1.5 M-parameter UNet."""
    unet = _unet_config(
        spec, (32, 64, 64), 64, layers_per_block=1, attention_head_dim=8, norm_num_groups=16
    )
    return PresetConfig(unet=unet, text_encoder=_text_config(spec, 64, 2, 4))


def ldm_256(spec: LatentSpec) -> PresetConfig:
    """CompVis text-to-image LDM class at 256x256 (f4: 64x64 latents, f8: 32x32)."""
    unet = _unet_config(spec, (320, 640, 1280, 1280), 768, layers_per_block=2, attention_head_dim=8)
    return PresetConfig(unet=unet, text_encoder=_text_config(spec, 768, 12, 12))


def pretrained(spec: LatentSpec) -> PresetConfig:
    """The configs of the local diffusers folder `spec.pretrained` (weights loaded later)."""
    folder = check_pipeline_folder(spec.pretrained)
    unet, text = part_config(folder, "unet"), part_config(folder, "text_encoder")
    return PresetConfig(unet=unet, text_encoder=text, pretrained=str(folder))


PRESETS: Registry[Callable[[LatentSpec], PresetConfig]] = Registry("diffusion preset")
PRESETS.register("tiny", tiny)
PRESETS.register("ldm-256", ldm_256)
PRESETS.register("pretrained", pretrained)


def preset_config(name: str, spec: LatentSpec) -> PresetConfig:
    """`PRESETS[name](spec)`; an unknown name lists the known ones."""
    return PRESETS[name](spec)


def build_unet(config: PresetConfig) -> UNet2DConditionModel:
    """The UNet, random or with the pretrained folder's weights."""
    if config.pretrained:
        variant = weights_variant(f"{config.pretrained}/unet")
        return UNet2DConditionModel.from_pretrained(
            config.pretrained, subfolder="unet", local_files_only=True, variant=variant
        )  # float32 whatever the files hold: the optimizer and autocast want fp32 masters
    return UNet2DConditionModel(**config.unet)


def build_text_encoder(config: PresetConfig) -> CLIPTextModel:
    """The CLIP text encoder, random or with the pretrained folder's weights."""
    if config.pretrained:
        variant = weights_variant(f"{config.pretrained}/text_encoder")
        return CLIPTextModel.from_pretrained(  # float32: transformers 5 keeps an fp16 variant fp16
            config.pretrained,
            subfolder="text_encoder",
            local_files_only=True,
            variant=variant,
            dtype=torch.float32,
        )
    fields = {k: v for k, v in config.text_encoder.items() if not k.startswith("_")}
    return CLIPTextModel(CLIPTextConfig(**fields))


def noise_scheduler(pretrained: str, asked: dict[str, Any]) -> DDPMScheduler:
    """The DDPM training schedule: the pretrained folder's scheduler config (its prediction
    type, betas, timestep spacing...), or `SCRATCH_SCHEDULE`; each `asked` value that is not
    None replaces the preset's (one that contradicts the folder is warned about)."""
    asked = {k: v for k, v in asked.items() if v is not None}
    if not pretrained:
        return DDPMScheduler(**{**SCRATCH_SCHEDULE, **asked}, clip_sample=False)
    config = scheduler_config(pretrained)
    differ = [
        f"{k}={v!r} (folder: {config.get(k)!r})" for k, v in asked.items() if config.get(k) != v
    ]
    if differ:
        rank_zero_warn(
            f"{pretrained}: training with {', '.join(differ)} instead of the pretrained "
            "model's own schedule; leave them unset (null) to follow the folder"
        )
    known = inspect.signature(DDPMScheduler.__init__).parameters
    config = {k: v for k, v in config.items() if k in known}  # PNDM/DDIM-only keys dropped
    return DDPMScheduler.from_config({"clip_sample": False, **config, **asked})


def scheduler_class(name: str) -> type[SchedulerMixin]:
    """A diffusers scheduler class by name; ValueError listing valid ones for anything else."""
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ValueError(
            f"scheduler {name!r} is not a diffusers scheduler class; use e.g. "
            f"{', '.join(COMMON_SCHEDULERS)}"
        )
    return cls


def sampling_scheduler(name: str, noise_config: Any) -> SchedulerMixin:
    """A sampler built on the training noise schedule; DDIM set up as diffusers recommends."""
    cls = scheduler_class(name)
    if name == "DDIMScheduler":
        return cls.from_config(
            noise_config, clip_sample=False, set_alpha_to_one=False, steps_offset=1
        )
    return cls.from_config(noise_config)
