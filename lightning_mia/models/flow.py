"""Flow-matching text-to-image family, in two architectures (`models.flow_arch`): Stable
Diffusion 3's MMDiT (`SD3Transformer2DModel`, two CLIP text encoders and, from a pretrained
folder, a T5) and FLUX's (`FluxTransformer2DModel`, a CLIP for the pooled embedding and a T5 for
the token states), over the frozen autoencoder's latents.

    python train.py fit --config configs/autoencoder/tiny-kl.yaml                # first, once
    python train.py fit --config configs/flow/tiny.yaml                          # target
    python train.py fit --config configs/flow/tiny.yaml --data.model_index 1     # shadow 1
    python train.py fit --config configs/flow/tiny.yaml --ckpt_path last         # resume
    python train.py fit --config configs/flow/flux-tiny.yaml                     # FLUX target

Training is rectified flow (conditional flow matching, as SD3 and FLUX train): x_t = (1 - t)·x0
+ t·eps at a noise level t in (0, 1), and the transformer learns the velocity v = eps - x0 (MSE
over the latent). t is drawn logit-normal (SD3's default) or uniform and shifted as the
scheduler's `shift` says (t' = s·t / (1 + (s - 1)·t)); caption dropout trains the null caption
for classifier-free guidance. Sampling is the Euler loop of `FlowMatchEulerDiscreteScheduler`
batched over captions x images (`models.flow_sampling`), equal to `StableDiffusion3Pipeline`
or `FluxPipeline` on the same weights and noise. `save_pipeline` writes that pipeline's folder,
and `preset: pretrained` fine-tunes either kind in full or with LoRA adapters (`lora_rank`,
`models.lora`). The family implements the gray-box interface of `models.latent` with time =
the noise level t in [0, 1] and the velocity as its prediction; its signals are in
`graybox/flow.py`, and neither they nor the module ask which architecture answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn

from lightning_mia.models.base import register_family
from lightning_mia.models.ema import EMAWeights
from lightning_mia.models.flow_arch import ARCHITECTURES
from lightning_mia.models.flow_presets import (
    PRESETS,
    FlowError,
    FlowSpec,
    flow_layout,
    flow_scheduler,
)
from lightning_mia.models.flow_sampling import sample_images
from lightning_mia.models.latent import Conditioning, LatentTextToImageModule, TimeGrid
from lightning_mia.models.lora import MMDIT_LORA_TARGETS, LoraError, add_adapters
from lightning_mia.models.pipeline_folder import native_resolution
from lightning_mia.models.precision import (
    FROZEN_DTYPES,
    FrozenDtype,
    cast_frozen_weights,
    held_in_float32,
    usable_cpu_attention,
)
from lightning_mia.models.tokenizers import TokenCache, load_clip_tokenizer
from lightning_mia.models.vae import check_resolution, load_autoencoder
from lightning_mia.paths import write_folder_atomically

WEIGHT_PARTS = (  # the module's parts with weights
    "vae",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
)


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift of noise levels u in [0, 1]: s·u / (1 + (s - 1)·u) (s = 1: none)."""
    return shift * u / (1 + (shift - 1) * u)


@register_family("flow")
class FlowMatchingModule(LatentTextToImageModule):
    """Text-to-image rectified flow (Stable Diffusion 3 / MMDiT architecture) on diffusers."""

    def __init__(
        self,
        preset: str = "tiny",
        autoencoder: str = "runs/demo/autoencoder",  # diffusers folder ("" with pretrained)
        tokenizer: str = "",  # CLIP tokenizer folder; "" = offline char-level (or pretrained's)
        max_caption_length: int = 128,  # tokens of the char-level tokenizer (folders keep theirs)
        # T5 tokens of a caption: None = the pipeline's default with a folder's T5 (SD3 256,
        # FLUX 512), the caption length for flux-tiny, 0 for SD3 without T5 (no zero rows;
        # call the saved pipeline with the same)
        max_sequence_length: int | None = None,
        pretrained: str = "",  # local StableDiffusion3Pipeline or FluxPipeline folder
        resolution: int = 32,  # image side; 0 = the pretrained folder's native one
        train_transformer: bool = True,  # False: the transformer stays the folder's
        # the text encoders: SD3's two CLIPs (a folder's T5 never); FLUX's CLIP, and its T5
        # only from scratch in full (flux-tiny): a folder's T5, or one under LoRA, never
        train_text_encoder: bool = True,
        lora_rank: int = 0,  # > 0: train LoRA adapters of this rank, base weights frozen
        lora_alpha: float = 0.0,  # LoRA scale alpha / rank; 0 = rank (scale 1)
        lora_targets: tuple[str, ...] = MMDIT_LORA_TARGETS,  # layer names (or endings) to adapt
        # dtype of the weights nothing trains (autoencoder, frozen text encoders, the base under
        # LoRA; models.precision): bfloat16 halves their memory, trained weights stay float32
        frozen_dtype: FrozenDtype = "float32",
        # folder parts read and kept in float32 although nothing trains them: an external
        # target's parts that its shadows train in full (external.target)
        float32_parts: tuple[str, ...] = (),
        shift: float | None = None,  # time shift; None = the preset's (the folder's, or 1)
        timestep_sampling: Literal["logit_normal", "uniform"] = "logit_normal",
        logit_mean: float = 0.0,  # logit-normal time sampling: mean and std of the logit
        logit_std: float = 1.0,
        caption_dropout: float = 0.1,  # empty caption with this probability (for CFG)
        num_inference_steps: int = 20,
        guidance_scale: float = 3.0,  # > 1: classifier-free guidance (as the SD3 pipeline)
        generation_batch_size: int = 256,  # images per Euler loop (guidance doubles it)
        ema_decay: float = 0.0,  # 0 = off; else sampling and signals use the EMA weights
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 0,
        random_crop: bool = False,
        random_flip: bool = False,
        cache_latents: bool = True,  # encode each training image once (only without crop/flip)
        sample_every_n_steps: int = 0,
        num_preview_images: int = 2,
    ) -> None:
        super().__init__(sample_every_n_steps, num_preview_images)
        self.save_hyperparameters()
        self._check_settings()
        if preset == "pretrained":
            layout = flow_layout(pretrained)  # SD3 or FLUX, checked before its parts are read
            resolution = resolution or native_resolution(pretrained, layout)
        self._autoencoder_folder = autoencoder or (f"{pretrained}/vae" if pretrained else "")
        if not self._autoencoder_folder:
            raise FlowError("FlowMatchingModule needs `autoencoder: <diffusers folder>`")
        from_folder = preset == "pretrained"
        self._tokenizer_folder = tokenizer or (f"{pretrained}/tokenizer" if from_folder else "")
        self.tokenizer = load_clip_tokenizer(self._tokenizer_folder, max_caption_length)
        self.vae = load_autoencoder(self._autoencoder_folder).requires_grad_(False)
        if self.vae.config.get("shift_factor") is None:  # the SD3 pipeline adds it unasked
            self.vae.register_to_config(shift_factor=0.0)
        latent_size = check_resolution(self.vae, resolution, f"autoencoder {autoencoder}")
        never = layout.never_trained if from_folder else ()
        config = PRESETS[preset](self._spec(latent_size, pretrained if from_folder else "", never))
        self.arch = ARCHITECTURES[config.arch]  # SD3 or FLUX: all that differs (flow_arch)
        self.never_trained = self.arch.never_trained(self.hparams)  # parts kept as built
        problems = self.arch.check(self.hparams, latent_size)
        if problems:
            raise FlowError("; ".join(problems))
        self.tokenizer_2 = self.arch.load_tokenizer_2(config.pretrained, self.tokenizer)
        self.transformer = self.arch.build_transformer(config)
        # SD3: two CLIPs (+ its T5 as text_encoder_3); FLUX: a CLIP and the T5 (text_encoder_2)
        texts = self.arch.build_text(config)
        self.text_encoder, self.text_encoder_2, self.text_encoder_3, self.tokenizer_3 = texts
        for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
            if getattr(self, name) is not None:
                getattr(self, name).requires_grad_(self._weights_train(name, self.never_trained))
        add_adapters(self)  # lora_rank > 0: LoRA in the tuned parts; no folder weights saved
        low = [getattr(self, name) for name in WEIGHT_PARTS if name not in float32_parts]
        cast_frozen_weights(low, FROZEN_DTYPES[frozen_dtype])
        usable_cpu_attention(FROZEN_DTYPES[frozen_dtype])
        self.noise_scheduler = flow_scheduler(config, shift)
        self.ema = EMAWeights(self._trained_parts(), ema_decay) if ema_decay > 0 else None
        self.resolution = resolution
        self.latent_shape = (self.vae.config.latent_channels, latent_size, latent_size)
        self.t5_length = max_sequence_length
        if self.t5_length is None:
            self.t5_length = self.arch.default_t5_length(self)
        self._tokens = TokenCache()
        self._latent_cache: dict[int, torch.Tensor] = {}  # sample_id -> (C, h, w), CPU

    def _check_settings(self) -> None:
        """One FlowError listing every problem with the settings (an unknown preset first)."""
        hp = self.hparams
        PRESETS[hp.preset]  # UnknownNameError listing the presets, before anything is loaded
        problems = []
        if hp.lora_rank and hp.ema_decay > 0:
            problems.append("ema_decay > 0 with lora_rank: an EMA of LoRA adapters is not built")
        if not 0.0 <= hp.caption_dropout < 1.0:
            problems.append(f"caption_dropout must be in [0, 1), got {hp.caption_dropout}")
        if hp.frozen_dtype not in FROZEN_DTYPES:
            problems.append(
                f"frozen_dtype must be one of {list(FROZEN_DTYPES)}, got {hp.frozen_dtype!r}"
            )
        unknown = sorted(set(hp.float32_parts) - set(WEIGHT_PARTS))
        if unknown:
            problems.append(f"float32_parts {unknown}: the parts are {list(WEIGHT_PARTS)}")
        if hp.logit_std <= 0:
            problems.append(f"logit_std must be > 0, got {hp.logit_std}")
        if hp.shift is not None and hp.shift <= 0:
            problems.append(f"shift must be > 0, got {hp.shift}")
        if problems:
            raise FlowError("; ".join(problems))

    def _weights_train(self, part: str, never: tuple[str, ...]) -> bool:
        """Whether an optimizer updates `part`'s own weights (a LoRA's adapters are not its
        own): the transformer with `train_transformer`, a text encoder with `train_text_encoder`
        unless the architecture never trains it (`never`), nothing under LoRA, SD3's T5 never.
        The folder's parts read in `frozen_dtype` and the parts that require grad both follow
        from it."""
        hp = self.hparams
        if hp.lora_rank > 0 or part == "text_encoder_3" or part in never:
            return False
        return hp.train_transformer if part == "transformer" else hp.train_text_encoder

    def _spec(self, latent_size: int, pretrained: str, never: tuple[str, ...]) -> FlowSpec:
        tok, hp = self.tokenizer, self.hparams
        parts = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
        return FlowSpec(
            latent_channels=self.vae.config.latent_channels,
            latent_size=latent_size,
            vocab_size=len(tok),
            max_length=tok.model_max_length,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            pretrained=pretrained,
            frozen_parts=tuple(  # the folder's parts whose weights no optimizer will touch
                part
                for part in parts
                if not self._weights_train(part, never) and part not in hp.float32_parts
            ),
            frozen_dtype=FROZEN_DTYPES[hp.frozen_dtype],
        )

    # --- components ----------------------------------------------------------------------------
    def _trained_parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"transformer": self.transformer}
        if self.hparams.train_text_encoder:
            for name in ("text_encoder", "text_encoder_2"):
                if name not in self.never_trained:
                    parts[name] = getattr(self, name)
        return parts

    def _frozen_parts(self) -> list[nn.Module]:
        trained = self._trained_parts().values()
        texts = (self.text_encoder, self.text_encoder_2, self.text_encoder_3)
        return [self.vae, *(p for p in texts if p is not None and p not in trained)]

    def released(self, use_ema: bool | None = None) -> dict[str, nn.Module]:
        """transformer, text_encoder, text_encoder_2 to query: the EMA copies when EMA is on
        and (by default) in eval mode, i.e. the released model; the live weights in training."""
        parts = {
            "transformer": self.transformer,
            "text_encoder": self.text_encoder,
            "text_encoder_2": self.text_encoder_2,
        }
        if use_ema is None:
            use_ema = not self.training
        if use_ema and self.ema is not None:
            parts.update(dict(self.ema.shadow.items()))
        return parts

    def card_references(self) -> dict[str, str]:
        return {"autoencoder": self._autoencoder_folder, "tokenizer": self._tokenizer_folder}

    # --- the gray-box interface (models.latent): time = noise level t in [0, 1] ---------------
    @property
    def time_grid(self) -> TimeGrid:
        n = int(self.noise_scheduler.config.num_train_timesteps)
        return TimeGrid(low=0.0, high=1.0, discrete=False, num_train_timesteps=n)

    def condition(self, captions: Sequence[str]) -> Conditioning:
        """(token states (B, T, J), pooled (B, P)) as the architecture's pipeline encodes."""
        return self.arch.condition(self, self.released(), list(captions))

    def conditioning_inputs(self) -> dict[str, Any]:
        """The architecture's text encoders (the released ones), tokenizers and lengths, and
        the transformer's joint attention width (SD3 pads the CLIP states to it)."""
        parts, tokenizers = self.released(), ("tokenizer", "tokenizer_2", "tokenizer_3")
        return {
            "arch": type(self.arch).__name__,
            **{name: parts[name] for name in ("text_encoder", "text_encoder_2")},
            "text_encoder_3": self.text_encoder_3,
            **{name: getattr(self, name) for name in tokenizers},
            "t5_length": self.t5_length,
            "joint_attention_dim": parts["transformer"].config.joint_attention_dim,
        }

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.to(x0.device, x0.dtype).reshape(-1, 1, 1, 1)
        return (1 - t) * x0 + t * noise

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The velocity (B, C, h, w) float32 at x_t, noise levels t (B,)."""
        timestep = t.to(x_t.device, torch.float32) * self.num_train_timesteps
        transformer = self.released()["transformer"]
        guidance = self.hparams.guidance_scale  # read by guidance-distilled FLUX models only
        return self.arch.forward(transformer, x_t, timestep, cond, guidance).float()

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return noise - x0

    def split_prediction(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) = (x_t + (1 - t)·v, x_t - t·v): the straight line's two ends."""
        t = t.to(x_t.device, x_t.dtype).reshape(-1, 1, 1, 1)
        return x_t + (1 - t) * prediction, x_t - t * prediction

    # --- training ------------------------------------------------------------------------------
    @property
    def training_shift(self) -> float:
        """The shift of the training noise levels: the scheduler's `shift`, or 1 when it shifts
        dynamically by resolution (FLUX.1, SD3.5 folders), where the scheduler's own training
        sigmas and diffusers' FLUX/SD3 training scripts leave the times unshifted."""
        config = self.noise_scheduler.config
        return 1.0 if config.get("use_dynamic_shifting", False) else float(config.shift)

    def sample_times(self, batch_size: int) -> torch.Tensor:
        """Training noise levels (B,) in (0, 1): logit-normal or uniform, then shifted."""
        hp = self.hparams
        if hp.timestep_sampling == "logit_normal":
            u = torch.sigmoid(torch.randn(batch_size) * hp.logit_std + hp.logit_mean)
        else:
            u = torch.rand(batch_size)
        return shifted(u, self.training_shift).to(self.device)

    def per_sample_loss(
        self,
        batch: dict[str, Any],
        times: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Flow-matching MSE of each sample (B,), mean over the latent's C, h, w.

        Gray-box attacks pass fixed noise levels `times` (B,) in [0, 1] and `noise`
        (B, C, h, w); in eval mode no caption is dropped and the EMA weights (if any) answer.
        """
        self.check_images(batch["pixel_values"])  # (B, 3, R, R)
        captions = self.drop_captions(batch["caption"])
        x0 = self.image_latents(batch)  # (B, C, h, w)
        noise = torch.randn_like(x0) if noise is None else noise.to(x0.device)
        times = self.sample_times(x0.shape[0]) if times is None else times.to(x0.device)
        return self.loss_at(x0, self.condition(captions), times, noise).loss

    # --- sampling ------------------------------------------------------------------------------
    def make_sampler(self) -> FlowMatchEulerDiscreteScheduler:
        """A fresh Euler sampler on the training schedule (its shift)."""
        return FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config)

    def sample_batch(
        self, captions: list[str], seeds: list[int], num_images: int, steps: int, scale: float
    ) -> torch.Tensor:
        """One batch of `generate`: batched Euler steps as StableDiffusion3Pipeline."""
        return sample_images(self, captions, seeds, num_images, steps, scale)

    # --- diffusers folders ---------------------------------------------------------------------
    def pipeline(self) -> Any:
        """The released model as its architecture's pipeline (`StableDiffusion3Pipeline` or
        `FluxPipeline`; EMA weights when EMA is on), sharing this module's parts. Call it with
        `max_sequence_length=self.t5_length` (0 for the SD3 scratch presets, which have no T5).
        With a `frozen_dtype` its parts differ in dtype, which the pipelines' own `__call__`
        does not mix: sample with `generate`, or call it under `held_in_float32`."""
        return self.arch.pipeline(self, self.released(use_ema=True))

    def save_pipeline(self, folder: str | Path) -> Path:
        """Write the architecture's pipeline folder (loadable with `preset: pretrained`; with
        diffusers, `FluxPipeline.from_pretrained(folder)`, or
        `StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None,
        tokenizer_3=None)` when it has no T5 encoder), every part in float32 (with a
        `frozen_dtype`, the frozen parts' values are those of that dtype)."""
        if self.hparams.lora_rank:
            raise LoraError("a LoRA model is exported as its adapter: models.lora.export_lora")
        pipe = self.pipeline()
        with held_in_float32(pipe.components.values()):
            return write_folder_atomically(folder, lambda tmp: pipe.save_pretrained(str(tmp)))
