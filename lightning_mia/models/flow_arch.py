"""The flow family's two transformer architectures behind one seam: Stable Diffusion 3's MMDiT
(`SD3Transformer2DModel`) and FLUX's (`FluxTransformer2DModel`).

    arch = ARCHITECTURES[preset.arch]                                 # "sd3" | "flux"
    transformer = arch.build_transformer(preset)
    text_encoder, text_encoder_2, text_encoder_3, tokenizer_3 = arch.build_text(preset)
    cond = arch.condition(module, parts, captions)                    # Conditioning (seq, pooled)
    v = arch.forward(transformer, x_t, timestep, cond, guidance)      # (B, C, h, w) velocity
    arch.set_timesteps(sampler, steps, transformer, latent_shape, device)  # the pipeline's

Both are rectified flows with the same training (x_t = (1 - t)·x0 + t·eps, velocity
eps - x0), the same Euler scheduler and the same gray-box interface, so `FlowMatchingModule`,
`graybox/flow.py` and the attacks never ask which one they hold. What differs lives here only,
each as its diffusers pipeline does it (`StableDiffusion3Pipeline`, `FluxPipeline`, diffusers
0.42), so the module's sampler equals the pipeline on the same weights and noise
(`tests/test_flow.py`, `tests/test_flux.py`):

- text: SD3 has two `CLIPTextModelWithProjection`s (penultimate states side by side, pooled
  projections concatenated), then T5 states or zero rows; FLUX has one `CLIPTextModel` (its
  pooled output only) and a T5 encoder (its states are the token sequence).
- the transformer's input: SD3 takes latents (B, C, h, w) and the timestep t·1000; FLUX takes
  2x2-packed latents (B, h/2·w/2, 4C), rotary positions (`img_ids`, `txt_ids`), the timestep
  t and, when guidance-distilled (FLUX.1-dev), a guidance value.
- the sampling grid: SD3's `set_timesteps(steps)` (mu from the image tokens when dynamically
  shifted); FLUX's sigmas linspace(1, 1/steps, steps) with mu from the image tokens.
- guidance: SD3 runs classifier-free guidance, uncond + s·(cond - uncond); FLUX reads its
  guidance embedding when distilled, else the same rule (the pipeline's `true_cfg_scale` with
  an empty negative prompt).
- the pipeline class written and read.

Where a gray-box signal asks a guidance-distilled FLUX model for its prediction, the guidance
value is the module's `guidance_scale` (the value its images are made with).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from lightning_mia.models.flow_presets import (
    FLUX_LAYOUT,
    SD3_LAYOUT,
    FlowPreset,
    build_t5,
    build_text_encoders,
    build_transformer,
    load_part,
)
from lightning_mia.models.flow_text import clip_states, sd3_conditioning
from lightning_mia.models.latent import Conditioning
from lightning_mia.models.lora import first_line
from lightning_mia.models.pipeline_folder import PipelineError, PipelineLayout


def image_token_shift(image_tokens: int, config: Any, max_shift: float) -> float:
    """The pipelines' mu for a dynamically shifted schedule: diffusers' `calculate_shift`
    (linear in the number of image tokens between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift)) with the scheduler's settings; `max_shift` is the
    pipeline's default (SD3 1.16, FLUX 1.15). Written out: importing a pipeline takes seconds."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    slope = (config.get("max_shift", max_shift) - base_shift) / (max_len - base_len)
    intercept = base_shift - slope * base_len  # in diffusers' order: the same float
    return image_tokens * slope + intercept


class FlowArchitecture(Protocol):
    """What differs between the flow family's transformers (see the module docstring)."""

    name: str
    layout: PipelineLayout

    def build_transformer(self, preset: FlowPreset) -> nn.Module: ...

    def build_text(self, preset: FlowPreset) -> tuple[nn.Module, nn.Module, Any, Any]: ...

    def load_tokenizer_2(self, folder: str, tokenizer: Any) -> Any: ...

    def default_t5_length(self, module: Any) -> int: ...

    def check(self, hparams: Any, latent_size: int) -> list[str]: ...

    def never_trained(self, hparams: Any) -> tuple[str, ...]: ...

    def condition(
        self, module: Any, parts: dict[str, nn.Module], captions: list[str]
    ) -> Conditioning: ...

    def forward(
        self,
        transformer: nn.Module,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        guidance: float,
    ) -> torch.Tensor: ...

    def set_timesteps(
        self,
        sampler: SchedulerMixin,
        steps: int,
        transformer: nn.Module,
        latent_shape: Sequence[int],
        device: Any,
    ) -> None: ...

    def uses_cfg(self, transformer: nn.Module, scale: float) -> bool: ...

    def pipeline(self, module: Any, parts: dict[str, nn.Module]) -> Any: ...


class PipelineOfLayout:
    """`pipeline()` of both architectures: the layout's pipeline class over the module's parts
    (every part the layout names: SD3's text_encoder_3 / tokenizer_3 too, None without T5)."""

    layout: PipelineLayout

    def pipeline(self, module: Any, parts: dict[str, nn.Module]) -> Any:
        import diffusers  # the pipeline classes: importing them is slow

        given = {**parts, "scheduler": module.make_sampler(), "vae": module.vae}
        kwargs = {p: given[p] if p in given else getattr(module, p) for p in self.layout.parts}
        return getattr(diffusers, self.layout.pipeline_class)(**kwargs)


class SD3Architecture(PipelineOfLayout):
    """Stable Diffusion 3: `SD3Transformer2DModel`, two CLIPs with projection (+ T5)."""

    name = "sd3"
    layout = SD3_LAYOUT

    def build_transformer(self, preset: FlowPreset) -> nn.Module:
        return build_transformer(preset)

    def build_text(self, preset: FlowPreset) -> tuple[nn.Module, nn.Module, Any, Any]:
        clip, clip_2 = build_text_encoders(preset)
        return (clip, clip_2, *build_t5(preset))

    def load_tokenizer_2(self, folder: str, tokenizer: Any) -> Any:
        from lightning_mia.models.tokenizers import load_clip_tokenizer

        return load_clip_tokenizer(f"{folder}/tokenizer_2") if folder else tokenizer

    def default_t5_length(self, module: Any) -> int:
        return 256 if module.text_encoder_3 is not None else 0  # the pipeline's default

    def check(self, hparams: Any, latent_size: int) -> list[str]:
        return []

    def never_trained(self, hparams: Any) -> tuple[str, ...]:
        """A folder's T5 (text_encoder_3): always the folder's."""
        return self.layout.never_trained

    def condition(
        self, module: Any, parts: dict[str, nn.Module], captions: list[str]
    ) -> Conditioning:
        """(token states (B, L + T, J), pooled (B, P)) as StableDiffusion3Pipeline encodes."""
        length = module.tokenizer.model_max_length  # the pipeline's length for both CLIPs
        clips = [
            clip_states(parts[name], module._tokens(tok, captions, length))
            for name, tok in (
                ("text_encoder", module.tokenizer),
                ("text_encoder_2", module.tokenizer_2),
            )
        ]
        t5 = None
        if module.text_encoder_3 is not None:
            ids = module._tokens(module.tokenizer_3, captions, module.t5_length)
            t5 = module.text_encoder_3(ids.to(module.device))[0]
        joint = parts["transformer"].config.joint_attention_dim
        return sd3_conditioning(clips, t5, module.t5_length, joint)

    def forward(
        self,
        transformer: nn.Module,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        guidance: float,
    ) -> torch.Tensor:
        dtype = transformer.dtype
        seq, pooled = cond.parts
        return transformer(
            hidden_states=x.to(dtype),
            timestep=timestep,
            encoder_hidden_states=seq.to(dtype),
            pooled_projections=pooled.to(dtype),
        ).sample

    def set_timesteps(
        self,
        sampler: SchedulerMixin,
        steps: int,
        transformer: nn.Module,
        latent_shape: Sequence[int],
        device: Any,
    ) -> None:
        """`set_timesteps` as StableDiffusion3Pipeline calls it (mu when dynamically
        shifted, from the number of image tokens)."""
        kwargs = {}
        if sampler.config.get("use_dynamic_shifting", False):
            patch = transformer.config.patch_size
            tokens = (latent_shape[1] // patch) * (latent_shape[2] // patch)
            kwargs["mu"] = image_token_shift(tokens, sampler.config, 1.16)
        sampler.set_timesteps(steps, device=device, **kwargs)

    def uses_cfg(self, transformer: nn.Module, scale: float) -> bool:
        return scale > 1.0


def pack(x: torch.Tensor) -> torch.Tensor:
    """FluxPipeline's 2x2 packing: (B, C, h, w) -> (B, h/2·w/2, 4C)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of `pack`: (B, h/2·w/2, 4C) -> (B, C, h, w)."""
    b, _, channels = x.shape
    x = x.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, h, w)


@lru_cache(maxsize=8)
def image_positions(h: int, w: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    """FluxPipeline's `img_ids` of an (h/2) x (w/2) token grid: rows (0, row, column). Built
    once per grid, device and dtype: every transformer pass reads them (on a GPU, a copy from
    the host per pass otherwise); the transformer only reads them. Built outside inference
    mode, so that ids first made by a query serve training in the same process too."""
    with torch.inference_mode(False):
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] += torch.arange(h // 2)[:, None]
        ids[..., 2] += torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxArchitecture(PipelineOfLayout):
    """FLUX.1: `FluxTransformer2DModel` over 2x2-packed latents, a CLIP (pooled) and a T5."""

    name = "flux"
    layout = FLUX_LAYOUT

    def build_transformer(self, preset: FlowPreset) -> nn.Module:
        if preset.pretrained:
            return load_part(preset, "transformer", FluxTransformer2DModel)
        return FluxTransformer2DModel(**preset.transformer)

    def build_text(self, preset: FlowPreset) -> tuple[nn.Module, nn.Module, Any, Any]:
        """(CLIPTextModel, T5EncoderModel, None, None): random or the folder's."""
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        if preset.pretrained:
            clip = load_part(preset, "text_encoder", CLIPTextModel)
            return clip, load_part(preset, "text_encoder_2", T5EncoderModel), None, None
        clip, t5 = (
            {k: v for k, v in c.items() if not k.startswith("_")} for c in preset.text_encoders
        )
        return CLIPTextModel(CLIPTextConfig(**clip)), T5EncoderModel(T5Config(**t5)), None, None

    def load_tokenizer_2(self, folder: str, tokenizer: Any) -> Any:
        """The T5 tokenizer of a folder; the scratch presets' T5 reads the CLIP tokenizer's ids
        (the character-level vocabulary, nothing to download)."""
        if not folder:
            return tokenizer
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(
                folder, subfolder="tokenizer_2", local_files_only=True
            )
        except (OSError, ValueError) as err:
            raise PipelineError(
                f"pipeline folder {folder}: tokenizer_2/ (FLUX's T5 tokenizer) does not load "
                f"({first_line(err)})"
            ) from err

    def default_t5_length(self, module: Any) -> int:
        """FluxPipeline's 512 for a folder's T5; the caption length for the scratch presets."""
        return 512 if module.hparams.preset == "pretrained" else module.tokenizer.model_max_length

    def check(self, hparams: Any, latent_size: int) -> list[str]:
        """What this package cannot do with a FLUX model as asked: an odd latent side (2x2
        packing)."""
        if latent_size % 2:
            return [
                f"FLUX packs 2x2 latent patches: the latent side must be even, got {latent_size}"
            ]
        return []

    def never_trained(self, hparams: Any) -> tuple[str, ...]:
        """The T5 (text_encoder_2) of a folder, or under LoRA: `train_text_encoder` then trains
        the CLIP alone, as diffusers' train_dreambooth(_lora)_flux.py `--train_text_encoder`
        does (the T5-XXL stays the folder's); the scratch presets train their small T5 in full
        with the CLIP."""
        if hparams.preset == "pretrained" or hparams.lora_rank:
            return self.layout.never_trained
        return ()

    def condition(
        self, module: Any, parts: dict[str, nn.Module], captions: list[str]
    ) -> Conditioning:
        """(T5 states (B, T, J), CLIP pooled output (B, P)) as FluxPipeline encodes."""
        clip, t5 = parts["text_encoder"], parts["text_encoder_2"]
        ids = module._tokens(module.tokenizer, captions, module.tokenizer.model_max_length)
        pooled = clip(ids.to(clip.device), output_hidden_states=False).pooler_output
        ids = module._tokens(module.tokenizer_2, captions, module.t5_length)
        seq = t5(ids.to(t5.device), output_hidden_states=False)[0]
        return Conditioning((seq, pooled))

    def forward(
        self,
        transformer: nn.Module,
        x: torch.Tensor,
        timestep: torch.Tensor,
        cond: Conditioning,
        guidance: float,
    ) -> torch.Tensor:
        """The velocity (B, C, h, w) at latents x and timesteps (B,) on the 0-1000 scale,
        through the packed call FluxPipeline makes."""
        dtype = transformer.dtype
        seq, pooled = cond.parts
        b, _, h, w = x.shape
        embed = None
        if transformer.config.guidance_embeds:
            embed = torch.full((b,), float(guidance), device=x.device, dtype=torch.float32)
        out = transformer(
            hidden_states=pack(x.to(dtype)),
            timestep=timestep / 1000,
            guidance=embed,
            pooled_projections=pooled.to(dtype),
            encoder_hidden_states=seq.to(dtype),
            txt_ids=torch.zeros(seq.shape[1], 3, device=x.device, dtype=seq.dtype),
            img_ids=image_positions(h, w, x.device, dtype),
        ).sample
        return unpack(out, h, w)

    def set_timesteps(
        self,
        sampler: SchedulerMixin,
        steps: int,
        transformer: nn.Module,
        latent_shape: Sequence[int],
        device: Any,
    ) -> None:
        """FluxPipeline's grid: sigmas linspace(1, 1/steps, steps) (the scheduler's own with
        `use_flow_sigmas`), mu from the packed image tokens."""
        _, h, w = latent_shape
        mu = image_token_shift((h // 2) * (w // 2), sampler.config, 1.15)
        if sampler.config.get("use_flow_sigmas", False):
            sampler.set_timesteps(steps, device=device, mu=mu)
        else:
            sampler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)

    def uses_cfg(self, transformer: nn.Module, scale: float) -> bool:
        return scale > 1.0 and not transformer.config.guidance_embeds


ARCHITECTURES: dict[str, FlowArchitecture] = {
    "sd3": SD3Architecture(),
    "flux": FluxArchitecture(),
}
