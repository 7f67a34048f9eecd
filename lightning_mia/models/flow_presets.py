"""Named sizes of the flow-matching family: `PRESETS[name](spec) -> FlowPreset`.

A preset gives the configs of the trained components (the `SD3Transformer2DModel` MMDiT and its
two CLIP text encoders with projection, as Stable Diffusion 3 has; or FLUX's transformer, CLIP
and T5) for a given latent space and vocabulary; the autoencoder and tokenizer come from their
folders. The SD3 presets trained from scratch have no T5 encoder: the pipeline then pads the T5
slot with zeros, as `StableDiffusion3Pipeline` does without `text_encoder_3`
(`max_sequence_length` zero tokens).

- `tiny`: 32x32 images (8x8x4 latents of the tiny f4 autoencoder), random init, a 4-layer
  64-wide MMDiT over 1x1 patches (~0.6 M parameters) and two 2-layer 32-wide CLIPs: trains on
  two CPU cores in minutes.
- `sd3-256`: 256x256 images (32x32x4 latents of the kl-f8 autoencoder, 2x2 patches: 256 image
  tokens), a 12-layer 768-wide MMDiT (DiT-B class) and two 12-layer CLIPs (768 and 512 wide),
  random init, trained from scratch on GPUs.
- `flux-tiny`: the FLUX architecture (`FluxTransformer2DModel`, models.flow_arch) over the same
  8x8x4 latents packed 2x2 into 16 tokens: 2 double- and 2 single-stream blocks of 4 heads of 16,
  a 2-layer CLIP (pooled) and a 2-layer T5 v1.1 encoder (states), 32 wide, random init.
- `pretrained`: the configs of a local StableDiffusion3Pipeline folder (transformer/, vae/,
  text_encoder/, text_encoder_2/, optional text_encoder_3/ (T5), tokenizer*/, scheduler/) or
  FluxPipeline folder (transformer/, vae/, text_encoder/ (CLIP), text_encoder_2/ (T5),
  tokenizer*/, scheduler/); its weights are loaded to fine-tune, and its scheduler's shift is
  the default.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from lightning_mia.errors import UserError
from lightning_mia.models.pipeline_folder import (
    PIPELINE_LAYOUTS,
    PipelineLayout,
    check_pipeline_folder,
    part_config,
    pipeline_class,
    scheduler_config,
    weights_variant,
)
from lightning_mia.models.precision import load_dtype
from lightning_mia.registry import Registry


class FlowError(UserError):
    """A flow-family setting this package cannot use as asked."""


SD3_LAYOUT = PipelineLayout(
    family="flow",
    pipeline_class="StableDiffusion3Pipeline",
    parts=(
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
        "scheduler",
    ),
    required=("transformer", "vae", "text_encoder", "text_encoder_2"),
    denoiser="transformer",
    what="SD3Transformer2DModel + AutoencoderKL + 2 CLIPTextModelWithProjection (+ T5)",
    part_classes={
        "transformer": "SD3Transformer2DModel",
        "text_encoder": "CLIPTextModelWithProjection",
        "text_encoder_2": "CLIPTextModelWithProjection",
        "text_encoder_3": "T5EncoderModel",
    },
    config="configs/flow/pretrained.yaml",
    lora_config="configs/flow/lora.yaml",
    never_trained=("text_encoder_3",),  # the T5-XXL: always the folder's
)
PIPELINE_LAYOUTS.register(SD3_LAYOUT.pipeline_class, SD3_LAYOUT)
FLUX_LAYOUT = PipelineLayout(
    family="flow",
    pipeline_class="FluxPipeline",
    parts=(
        "transformer",
        "vae",
        "text_encoder",
        "text_encoder_2",
        "tokenizer",
        "tokenizer_2",
        "scheduler",
    ),
    required=("transformer", "vae", "text_encoder", "text_encoder_2"),
    denoiser="transformer",
    what="FluxTransformer2DModel + AutoencoderKL + CLIPTextModel + T5EncoderModel",
    part_classes={
        "transformer": "FluxTransformer2DModel",
        "text_encoder": "CLIPTextModel",
        "text_encoder_2": "T5EncoderModel",
    },
    config="configs/flow/flux-pretrained.yaml",
    lora_config="configs/flow/flux-lora.yaml",
    sample_size=128,  # FluxPipeline's default_sample_size: 1024 px over the f8 autoencoder
    never_trained=("text_encoder_2",),  # the T5-XXL, as diffusers' FLUX training scripts
)
PIPELINE_LAYOUTS.register(FLUX_LAYOUT.pipeline_class, FLUX_LAYOUT)
CLIP_PARTS = ("text_encoder", "text_encoder_2")
SCRATCH_SHIFT = 1.0  # the schedule shift of the presets trained from scratch (SD3 at 1024 px: 3)


@dataclass(frozen=True)
class FlowSpec:
    """What a preset needs to know: the latent space, the vocabulary, an optional folder."""

    latent_channels: int
    latent_size: int
    vocab_size: int
    max_length: int = 77
    bos_token_id: int = 0
    eos_token_id: int = 1
    pad_token_id: int = 1
    pretrained: str = ""
    frozen_parts: tuple[str, ...] = ()  # the folder's parts whose weights will stay frozen,
    frozen_dtype: torch.dtype = torch.float32  # read in this dtype (models.precision)


@dataclass(frozen=True)
class FlowPreset:
    """Configs of the trained components: the transformer's and the text encoders' (SD3: two
    `CLIPTextConfig`s; FLUX: a `CLIPTextConfig` and a `T5Config`)."""

    transformer: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # text_encoder, text_encoder_2
    shift: float = SCRATCH_SHIFT
    pretrained: str = ""  # folder whose weights to load ("" = random init)
    arch: str = "sd3"  # the transformer's architecture (models.flow_arch): "sd3" | "flux"
    has_t5: bool = False  # an SD3 folder with text_encoder_3/ (a T5 encoder)
    scheduler: dict[str, Any] = field(default_factory=dict)  # the folder's scheduler config
    frozen_parts: tuple[str, ...] = ()  # folder parts read in `frozen_dtype` (FlowSpec's)
    frozen_dtype: torch.dtype = torch.float32


def _clip(spec: FlowSpec, hidden: int, layers: int, heads: int) -> dict[str, Any]:
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


def _mmdit(
    spec: FlowSpec, patch: int, layers: int, heads: int, head_dim: int, texts: tuple
) -> dict:
    """An SD3 transformer over the latent grid; its text width is the CLIPs' widths together
    (their states concatenated, no T5), its pooled width their projections together."""
    return dict(
        sample_size=spec.latent_size,
        patch_size=patch,
        in_channels=spec.latent_channels,
        out_channels=spec.latent_channels,
        num_layers=layers,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=sum(t["hidden_size"] for t in texts),
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=sum(t["projection_dim"] for t in texts),
        pos_embed_max_size=spec.latent_size // patch,
    )


def tiny(spec: FlowSpec) -> FlowPreset:
    """8x8x4 latents (32x32 pixels, f4): 4 MMDiT layers, 4 heads of 16, 1x1 patches."""
    texts = (_clip(spec, 32, 2, 2), _clip(spec, 32, 2, 2))
    return FlowPreset(transformer=_mmdit(spec, 1, 4, 4, 16, texts), text_encoders=texts)


def sd3_256(spec: FlowSpec) -> FlowPreset:
    """32x32 latents (256 pixels, f8), 2x2 patches: 12 MMDiT layers of 12 heads of 64."""
    texts = (_clip(spec, 768, 12, 12), _clip(spec, 512, 12, 8))
    return FlowPreset(transformer=_mmdit(spec, 2, 12, 12, 64, texts), text_encoders=texts)


def _t5(spec: FlowSpec, d_model: int, layers: int, heads: int) -> dict[str, Any]:
    """A T5 v1.1 encoder (gated GELU, as FLUX's T5-XXL) over the caption vocabulary."""
    return dict(
        vocab_size=spec.vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=2 * d_model,
        num_layers=layers,
        num_heads=heads,
        feed_forward_proj="gated-gelu",
        pad_token_id=spec.pad_token_id,
        eos_token_id=spec.eos_token_id,
        decoder_start_token_id=spec.pad_token_id,
    )


def flux_tiny(spec: FlowSpec) -> FlowPreset:
    """8x8x4 latents (32x32 pixels, f4) packed 2x2 into 16 tokens of 16 channels: 2 double-
    stream and 2 single-stream FLUX blocks of 4 heads of 16, a 2-layer 32-wide CLIP (pooled)
    and a 2-layer 32-wide T5 (states), no guidance embedding (trained with caption dropout and
    sampled with classifier-free guidance)."""
    clip, t5 = _clip(spec, 32, 2, 2), _t5(spec, 32, 2, 2)
    transformer = dict(
        patch_size=1,
        in_channels=4 * spec.latent_channels,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=t5["d_model"],
        pooled_projection_dim=clip["hidden_size"],
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),  # (index, row, column) rotary dims: their sum is a head's
    )
    return FlowPreset(transformer=transformer, text_encoders=(clip, t5), arch="flux")


def flow_layout(folder: str) -> PipelineLayout:
    """The layout of a flow-family folder (FluxPipeline or StableDiffusion3Pipeline), checked:
    a folder of another class gets one PipelineError line naming the family that runs it."""
    path = Path(folder)
    name = pipeline_class(path) if str(folder) and path.is_dir() else None
    layout = FLUX_LAYOUT if name == FLUX_LAYOUT.pipeline_class else SD3_LAYOUT
    check_pipeline_folder(folder, layout)
    return layout


def pretrained(spec: FlowSpec) -> FlowPreset:
    """The configs of the local StableDiffusion3Pipeline or FluxPipeline folder
    `spec.pretrained`."""
    layout = flow_layout(spec.pretrained)
    folder = Path(spec.pretrained)
    sched = scheduler_config(folder)
    flux = layout is FLUX_LAYOUT
    return FlowPreset(
        transformer=part_config(folder, "transformer"),
        text_encoders=tuple(part_config(folder, p) for p in CLIP_PARTS),
        shift=float(sched.get("shift", 1.0)),
        pretrained=str(folder),
        arch="flux" if flux else "sd3",
        has_t5=not flux and (folder / "text_encoder_3" / "config.json").is_file(),
        scheduler=sched,
        frozen_parts=spec.frozen_parts,
        frozen_dtype=spec.frozen_dtype,
    )


PRESETS: Registry[Callable[[FlowSpec], FlowPreset]] = Registry("flow preset")
PRESETS.register("tiny", tiny)
PRESETS.register("sd3-256", sd3_256)
PRESETS.register("flux-tiny", flux_tiny)
PRESETS.register("pretrained", pretrained)


def load_part(preset: FlowPreset, part: str, cls: Any) -> Any:
    """`cls.from_pretrained(folder, subfolder=part)` of the preset's folder, from local files
    only, in float32, or in the preset's `frozen_dtype` when the part's weights stay frozen (an
    fp16/bf16-variant folder too: `weights_variant`)."""
    folder = preset.pretrained
    dtype = load_dtype(part, preset.frozen_parts, preset.frozen_dtype)
    key = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"
    return cls.from_pretrained(
        folder,
        subfolder=part,
        local_files_only=True,
        variant=weights_variant(f"{folder}/{part}"),
        **{key: dtype},
    )


def build_transformer(preset: FlowPreset) -> SD3Transformer2DModel:
    """The MMDiT, random or with the pretrained folder's weights (`load_part`'s dtype)."""
    if preset.pretrained:
        return load_part(preset, "transformer", SD3Transformer2DModel)
    return SD3Transformer2DModel(**preset.transformer)


def build_text_encoders(preset: FlowPreset) -> list[CLIPTextModelWithProjection]:
    """The two CLIP text encoders (with projection), random or the folder's."""
    if preset.pretrained:
        return [load_part(preset, p, CLIPTextModelWithProjection) for p in CLIP_PARTS]
    configs = [{k: v for k, v in c.items() if not k.startswith("_")} for c in preset.text_encoders]
    return [CLIPTextModelWithProjection(CLIPTextConfig(**c)) for c in configs]


def build_t5(preset: FlowPreset) -> tuple[Any, Any]:
    """(T5 encoder, its tokenizer) of a pretrained folder that has them, else (None, None)."""
    if not preset.has_t5:
        return None, None
    from transformers import AutoTokenizer, T5EncoderModel

    folder = preset.pretrained
    tokenizer = AutoTokenizer.from_pretrained(
        folder, subfolder="tokenizer_3", local_files_only=True
    )
    return load_part(preset, "text_encoder_3", T5EncoderModel), tokenizer


def flow_scheduler(preset: FlowPreset, shift: float | None) -> FlowMatchEulerDiscreteScheduler:
    """The Euler flow-matching scheduler: the folder's config (or the defaults) with `shift`
    (None = the preset's: the folder's, or `SCRATCH_SHIFT`)."""
    config = {**preset.scheduler, "shift": preset.shift if shift is None else shift}
    return FlowMatchEulerDiscreteScheduler.from_config(config)
