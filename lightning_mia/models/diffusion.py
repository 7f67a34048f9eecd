"""Latent diffusion text-to-image family: UNet + frozen autoencoder + CLIP text encoder.

    python train.py fit --config configs/diffusion/tiny.yaml                        # target
    python train.py fit --config configs/diffusion/tiny.yaml --data.model_index 1   # shadow 1

Training is DDPM (epsilon or v-prediction) on the autoencoder's scaled latents with caption
dropout for classifier-free guidance; sampling is DDIM (or any diffusers scheduler) batched over
captions x images in one denoising loop, each caption's noise drawn from its own seed. The parts
stay separate (`unet`, `vae`, `text_encoder`, `tokenizer`, `noise_scheduler`) so gray-box
attacks can query each; `save_pipeline` writes a StableDiffusionPipeline folder and
`preset: pretrained` fine-tunes one (on its own noise schedule and prediction type, at its
native resolution with `resolution: 0`), in full or with LoRA adapters (`lora_rank`, see
`models.lora`); weights that stay the folder's are referenced by sha256, not stored. The family
implements the gray-box interface of `models.latent` with integer DDPM timesteps as its time and
the UNet's output (eps, v or x0 by prediction type) as its prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from lightning_mia.models.base import register_family
from lightning_mia.models.diffusion_presets import (
    SCRATCH_SCHEDULE,
    LatentSpec,
    build_text_encoder,
    build_unet,
    noise_scheduler,
    preset_config,
    sampling_scheduler,
    scheduler_class,
)
from lightning_mia.models.diffusion_sampling import sample_images
from lightning_mia.models.ema import EMAWeights
from lightning_mia.models.latent import (
    Conditioning,
    Denoised,
    LatentTextToImageModule,
    TimeGrid,
)
from lightning_mia.models.lora import LORA_TARGETS, LoraError, add_adapters
from lightning_mia.models.pipeline_folder import check_pipeline_folder, native_resolution
from lightning_mia.models.tokenizers import TokenCache, load_clip_tokenizer
from lightning_mia.models.vae import check_resolution, load_autoencoder
from lightning_mia.paths import write_folder_atomically


def training_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the denoiser learns to output at `scheduler.add_noise(latents, noise, timesteps)`,
    by the scheduler's `prediction_type` (diffusers' conventions): noise, velocity or sample."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def split_prediction(
    output: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) predictions from the model output at x_t with signal level abar (B,1,1,1).

    x_t = a·x0 + s·eps with a = sqrt(ᾱ), s = sqrt(1 - ᾱ); v = a·eps - s·x0.
    """
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        return output, (x_t - s * output) / a
    if prediction_type == "v_prediction":
        return s * x_t + a * output, a * x_t - s * output
    if prediction_type == "sample":
        return (x_t - a * output) / s, output
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


@register_family("diffusion")
class LatentDiffusionModule(LatentTextToImageModule):
    """Text-to-image latent diffusion (LDM / Stable Diffusion architecture) on diffusers."""

    def __init__(
        self,
        preset: str = "tiny",
        autoencoder: str = "runs/demo/autoencoder",  # diffusers folder ("" with pretrained)
        tokenizer: str = "",  # CLIP tokenizer folder; "" = offline char-level (or pretrained's)
        max_caption_length: int = 128,  # tokens of the char-level tokenizer (folders keep theirs)
        pretrained: str = "",  # local StableDiffusionPipeline folder for preset "pretrained"
        resolution: int = 32,  # image side; 0 = the pretrained folder's native one
        train_unet: bool = True,  # False: the UNet stays the folder's (e.g. an external target)
        train_text_encoder: bool = True,
        lora_rank: int = 0,  # > 0: train LoRA adapters of this rank, base weights frozen
        lora_alpha: float = 0.0,  # LoRA scale alpha / rank; 0 = rank (scale 1)
        lora_targets: tuple[str, ...] = LORA_TARGETS,  # module names (or name endings) to adapt
        # noise schedule; None = the preset's (pretrained: the folder's scheduler config)
        prediction_type: Literal["epsilon", "v_prediction"] | None = None,
        beta_schedule: str | None = None,
        beta_start: float | None = None,
        beta_end: float | None = None,
        num_train_timesteps: int | None = None,
        caption_dropout: float = 0.1,  # empty caption with this probability (for CFG)
        scheduler: str = "DDIMScheduler",  # sampler: any diffusers scheduler class name
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        generation_batch_size: int = 256,  # images per denoising loop (CFG doubles it)
        ema_decay: float = 0.0,  # 0 = off; else sampling uses the EMA weights
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
        scheduler_class(scheduler)  # unknown names fail now, not at the first sample grid
        if preset == "pretrained":
            check_pipeline_folder(pretrained)  # before its tokenizer/ and vae/ are read
            resolution = resolution or native_resolution(pretrained)
        if lora_rank and ema_decay > 0:
            raise LoraError("ema_decay > 0 with lora_rank: an EMA of LoRA adapters is not built")
        self._autoencoder_folder = autoencoder or (f"{pretrained}/vae" if pretrained else "")
        if not self._autoencoder_folder:
            raise ValueError("LatentDiffusionModule needs `autoencoder: <diffusers folder>`")
        self._tokenizer_folder = tokenizer or (
            f"{pretrained}/tokenizer" if preset == "pretrained" else ""
        )
        self.tokenizer = load_clip_tokenizer(self._tokenizer_folder, max_caption_length)
        self.vae = load_autoencoder(self._autoencoder_folder).requires_grad_(False)
        latent_size = check_resolution(self.vae, resolution, f"autoencoder {autoencoder}")
        spec = LatentSpec(
            latent_channels=self.vae.config.latent_channels,
            latent_size=latent_size,
            vocab_size=len(self.tokenizer),
            max_length=self.tokenizer.model_max_length,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            pretrained=pretrained,
        )
        config = preset_config(preset, spec)
        self.unet = build_unet(config).requires_grad_(train_unet and not lora_rank)
        self.text_encoder = build_text_encoder(config)
        self.text_encoder.requires_grad_(train_text_encoder and not lora_rank)
        add_adapters(self)  # lora_rank > 0: LoRA in the tuned parts; no folder weights saved
        asked = {k: self.hparams[k] for k in SCRATCH_SCHEDULE}  # the schedule's arguments
        self.noise_scheduler = noise_scheduler(config.pretrained, asked)
        self.ema = EMAWeights(self._trained_parts(), ema_decay) if ema_decay > 0 else None
        self.resolution = resolution
        self.latent_shape = (spec.latent_channels, latent_size, latent_size)
        self._tokens = TokenCache()
        self._latent_cache: dict[int, torch.Tensor] = {}  # sample_id -> (C, h, w), CPU

    # --- components ----------------------------------------------------------------------------
    def _trained_parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"unet": self.unet}
        if self.hparams.train_text_encoder:
            parts["text_encoder"] = self.text_encoder
        return parts

    def denoiser(self, use_ema: bool | None = None) -> tuple[nn.Module, nn.Module]:
        """(unet, text_encoder) to query: the EMA copies when EMA is on and (by default) in eval
        mode, i.e. the released model; the live weights while training."""
        if use_ema is None:
            use_ema = not self.training
        if not use_ema or self.ema is None:
            return self.unet, self.text_encoder
        shadow = self.ema.shadow
        text = shadow["text_encoder"] if "text_encoder" in shadow else self.text_encoder
        return shadow["unet"], text

    def token_ids(self, captions: Sequence[str]) -> torch.Tensor:
        """Padded CLIP token ids (B, L), cached per caption (captions repeat every epoch)."""
        return self._tokens(self.tokenizer, captions, self.tokenizer.model_max_length).to(
            self.device
        )

    def encode_text(self, captions: Sequence[str], text_encoder: nn.Module | None = None) -> Any:
        """Caption embeddings (B, L, D) for the UNet's cross-attention."""
        encoder = text_encoder if text_encoder is not None else self.text_encoder
        return encoder(self.token_ids(captions))[0]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def card_references(self) -> dict[str, str]:
        return {"autoencoder": self._autoencoder_folder, "tokenizer": self._tokenizer_folder}

    # --- training ----------------------------------------------------------------------------
    def per_sample_loss(
        self,
        batch: dict[str, Any],
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Denoising MSE of each sample (B,), mean over the latent's C, h, w.

        Gray-box attacks pass fixed `timesteps` (B,) and `noise` (B, C, h, w); in eval mode no
        caption is dropped and the EMA weights (if any) answer.
        """
        self.check_images(batch["pixel_values"])  # (B, 3, R, R)
        captions = self.drop_captions(batch["caption"])
        latents = self.image_latents(batch)  # (B, C, h, w)
        b = latents.shape[0]
        if noise is None:
            noise = torch.randn_like(latents)
        if timesteps is None:
            high = self.noise_scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, high, (b,), device=latents.device)
        unet, text_encoder = self.denoiser()
        context = self.encode_text(captions, text_encoder)  # (B, L, D)
        return self.denoise(latents, context, timesteps, noise, unet).loss

    def denoise(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        timesteps: torch.Tensor,
        noise: torch.Tensor,
        unet: nn.Module | None = None,
    ) -> Denoised:
        """Noise clean `latents` (B, C, h, w) to `timesteps` (B,) with `noise` and run the UNet
        (default: the live one) on them with text `context` (B, L, D): the one place the
        training loss is defined, for training and for the gray-box signals alike."""
        timesteps = timesteps.to(latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        unet = self.unet if unet is None else unet
        pred = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=context.to(unet.dtype))
        target = training_target(self.noise_scheduler, latents, noise, timesteps)
        return Denoised(noisy, pred.sample, target)

    # --- the gray-box interface (models.latent) -----------------------------------------------
    @property
    def time_grid(self) -> TimeGrid:
        """Integer DDPM timesteps 0 .. num_train_timesteps - 1."""
        n = int(self.noise_scheduler.config.num_train_timesteps)
        return TimeGrid(low=0, high=n - 1, discrete=True, num_train_timesteps=n)

    def condition(self, captions: Sequence[str]) -> Conditioning:
        """The text encoder's states (B, S, D) float32 (the EMA copy in eval, if any)."""
        return Conditioning((self.encode_text(list(captions), self.denoiser()[1]).float(),))

    def conditioning_inputs(self) -> dict[str, Any]:
        return {"text_encoder": self.denoiser()[1], "tokenizer": self.tokenizer}

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t.to(x0.device).long())

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        unet = self.denoiser()[0]
        context = cond.parts[0].to(unet.dtype)
        return unet(x_t.to(unet.dtype), t.long(), encoder_hidden_states=context).sample.float()

    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        return training_target(self.noise_scheduler, x0, noise, t.to(x0.device).long())

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """Cumulative signal level ᾱ_t (B, 1, 1, 1) float32 of timesteps t (B,)."""
        alphas = self.noise_scheduler.alphas_cumprod.to(t.device, torch.float32)
        return alphas[t.long()].reshape(-1, 1, 1, 1)

    def split_prediction(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) by the scheduler's prediction type (epsilon, v_prediction or sample)."""
        kind = str(self.noise_scheduler.config.prediction_type)
        return split_prediction(prediction, x_t, self.alpha_bar(t.to(x_t.device)), kind)

    def _frozen_parts(self) -> list[nn.Module]:
        """The autoencoder (and a frozen text encoder) stay in eval mode while training."""
        frozen = [] if self.hparams.train_text_encoder else [self.text_encoder]
        return [self.vae, *frozen]

    # --- sampling ------------------------------------------------------------------------------
    def make_sampler(self) -> SchedulerMixin:
        """A fresh sampling scheduler (configured class) on the training noise schedule."""
        return sampling_scheduler(self.hparams.scheduler, self.noise_scheduler.config)

    def sample_batch(
        self, captions: list[str], seeds: list[int], num_images: int, steps: int, scale: float
    ) -> torch.Tensor:
        """One batch of `generate`: DDIM/DDPM sampling with classifier-free guidance."""
        return sample_images(self, captions, seeds, num_images, steps, scale)

    # --- diffusers folders and checkpoints ----------------------------------------------------
    def pipeline(self) -> Any:
        """The released model as a diffusers pipeline (EMA weights when EMA is on)."""
        unet, text_encoder = self.denoiser(use_ema=True)
        from diffusers import StableDiffusionPipeline  # here: it prints a notice when imported

        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=text_encoder,
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=self.make_sampler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pipeline(self, folder: str | Path) -> Path:
        """Write a StableDiffusionPipeline folder (loadable with `preset: pretrained`)."""
        if self.hparams.lora_rank:
            raise LoraError("a LoRA model is exported as its adapter: models.lora.export_lora")
        pipe = self.pipeline()
        return write_folder_atomically(folder, lambda tmp: pipe.save_pretrained(str(tmp)))
