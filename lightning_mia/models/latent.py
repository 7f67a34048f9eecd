"""The family interface of text-to-image models over a continuous latent space with a time axis
(latent diffusion, flow matching): what every gray-box signal asks of a model, and what such
families share (a frozen autoencoder kept out of checkpoints, cached latents, EMA, optimizer).

    x0 = model.encode_images(images)                  # (B, 3, R, R) in [-1, 1] -> (B, C, h, w)
    cond = model.condition(captions)                  # Conditioning of B captions ("" = null)
    t = model.time_grid.full(len(cond), 0.5, x0.device)   # (B,) in the family's own time unit
    x_t = model.noised(x0, noise, t)                  # clean latents moved to time t
    pred = model.predict(x_t, t, cond)                # the network's output: its target's estimate
    noise_hat, x0_hat = model.split_prediction(pred, x_t, t)
    loss = (pred - model.training_target(x0, noise, t)) ** 2

Time runs from clean latents at `time_grid.low` to pure noise at `time_grid.high`: integer DDPM
timesteps for the diffusion family, the noise level sigma in [0, 1] for the flow family. A
deterministic move from t to t' along the model's own prediction (a DDIM step, an Euler step of
the probability-flow ODE) is `noised(x0_hat, noise_hat, t')` of the prediction at (x_t, t) for
both (`graybox.denoiser.LatentView.move`). `predict` and
`condition` answer with the released weights (the EMA copies, when EMA is on) in eval mode and
with the live ones in training, as `per_sample_loss` does. Signals never reach into a model's
parts (`vae`, `unet`, `transformer`, schedulers): a new family implements these methods and its
signals work on it.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from lightning_mia.card import CARD_KEY, RunCard
from lightning_mia.models.base import TextToImageModule, cached_by_id, caption_seeds
from lightning_mia.models.pipeline_folder import check_references, record_references
from lightning_mia.models.vae import encode_latents

NULL_CAPTION = ""  # the unconditional path: what caption dropout trains (`drop_captions`)


@dataclass(frozen=True)
class TimeGrid:
    """A family's time axis: `t` from `low` (clean latents) to `high` (pure noise).

    `discrete`: integer timesteps (DDPM) or continuous times (flow matching);
    `num_train_timesteps`: the training scheduler's grid (flow: the network is fed t times it).
    """

    low: float
    high: float
    discrete: bool
    num_train_timesteps: int

    def full(self, batch_size: int, t: float, device: Any = "cpu") -> torch.Tensor:
        """Time t for B samples, (B,): int64 on a discrete grid, float32 otherwise."""
        dtype = torch.long if self.discrete else torch.float32
        return torch.full((batch_size,), t, dtype=dtype, device=device)

    def contains(self, t: float) -> bool:
        """Whether t is a time of this grid (an integer on a discrete one)."""
        if self.discrete and int(t) != t:
            return False
        return self.low <= t <= self.high


@dataclass(frozen=True)
class Conditioning:
    """The caption conditioning of B captions as a family's network takes it: tensors whose
    first dimension is the batch (diffusion: the text encoder's states (B, S, D); flow: token
    states (B, S, D) and pooled embeddings (B, P))."""

    parts: tuple[torch.Tensor, ...]

    def __len__(self) -> int:
        return self.parts[0].shape[0]

    def repeat(self, k: int) -> Conditioning:
        """k copies stacked, (kB, ...): copy j holds rows j*B .. (j+1)*B - 1."""
        return Conditioning(tuple(p.repeat(k, *([1] * (p.ndim - 1))) for p in self.parts))

    def repeat_interleave(self, k: int) -> Conditioning:
        """Each row k times in a row, (kB, ...): rows i*k .. (i+1)*k - 1 are caption i."""
        return Conditioning(tuple(p.repeat_interleave(k, dim=0) for p in self.parts))

    def rows(self, start: int, stop: int) -> Conditioning:
        """Rows start .. stop - 1."""
        return Conditioning(tuple(p[start:stop] for p in self.parts))

    @staticmethod
    def cat(conds: Sequence[Conditioning]) -> Conditioning:
        """Conditionings stacked along the batch, in order."""
        return Conditioning(tuple(torch.cat(ps) for ps in zip(*(c.parts for c in conds))))


class Denoised(NamedTuple):
    """One network pass on noised latents: its input, output and training target."""

    noisy: torch.Tensor  # x_t (B, C, h, w)
    prediction: torch.Tensor  # the network's output at x_t (B, C, h, w)
    target: torch.Tensor  # what it is trained to output there (B, C, h, w)

    @property
    def loss(self) -> torch.Tensor:
        """The training loss of each sample (B,): MSE over the latent's C, h, w."""
        return (self.prediction.float() - self.target.float()).pow(2).flatten(1).mean(1)


class LatentTextToImageModule(TextToImageModule):
    """Base of the continuous-latent families: the gray-box interface (abstract) and the frozen
    autoencoder `self.vae` they share. Subclasses set `self.vae`, `self.resolution`,
    `self.latent_shape`, `self.ema` (None or `EMAWeights`) and `self._latent_cache = {}`."""

    frozen_prefix = "vae."
    autoencoder_what = "image autoencoder"
    null_caption: ClassVar[str] = NULL_CAPTION
    vae: nn.Module
    ema: Any
    resolution: int
    latent_shape: tuple[int, int, int]
    _latent_cache: dict[int, torch.Tensor]

    # --- the gray-box interface ---------------------------------------------------------------
    @property
    @abstractmethod
    def time_grid(self) -> TimeGrid:
        """The model's time axis (valid times, discrete or continuous)."""

    @property
    def num_train_timesteps(self) -> int:
        return int(self.time_grid.num_train_timesteps)

    @abstractmethod
    def condition(self, captions: Sequence[str]) -> Conditioning:
        """The conditioning of captions ("" = the null caption), by the released text encoder."""

    @abstractmethod
    def conditioning_inputs(self) -> dict[str, Any]:
        """Everything `condition` reads (its text encoders, tokenizers and settings, by name):
        two models with equal inputs condition every caption alike, so what a signal derives
        from the conditioning alone is computed once for both (graybox/encodings.py)."""

    @abstractmethod
    def noised(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Clean latents x0 (B, C, h, w) moved to times t (B,) with `noise` (B, C, h, w)."""

    @abstractmethod
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The network's output (B, C, h, w) float32 at x_t, times t (B,): its estimate of
        `training_target` (diffusion: eps / v / x0 by prediction type; flow: the velocity)."""

    @abstractmethod
    def training_target(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """What the network learns to output at `noised(x0, noise, t)`, (B, C, h, w)."""

    @abstractmethod
    def split_prediction(
        self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, clean latents) the prediction at x_t implies, (B, C, h, w) each."""

    @abstractmethod
    def _trained_parts(self) -> dict[str, nn.Module]:
        """The parts the optimizer trains (the EMA follows them)."""

    # --- built on the interface ---------------------------------------------------------------
    def loss_at(
        self, x0: torch.Tensor, cond: Conditioning, t: torch.Tensor, noise: torch.Tensor
    ) -> Denoised:
        """Noise x0 (B, C, h, w) to times t (B,) and run the network there with `cond`."""
        x_t = self.noised(x0, noise, t)
        prediction = self.predict(x_t, t, cond)
        return Denoised(x_t, prediction, self.training_target(x0, noise, t))

    def check_images(self, pixel_values: torch.Tensor) -> None:
        """ValueError unless images are (B, 3, R, R) at the model's resolution R."""
        r = self.resolution
        if tuple(pixel_values.shape[-2:]) != (r, r):
            raise ValueError(
                f"images are {tuple(pixel_values.shape[-2:])} but the model is configured for "
                f"resolution {r}: set data.resolution to match"
            )

    def image_autoencoder(self) -> nn.Module:
        """The frozen autoencoder that turns images into latents."""
        return self.vae

    @torch.no_grad()
    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) float32 of images (B, 3, R, R) in [-1, 1]."""
        self.check_images(x)
        return encode_latents(self.vae, x.to(self.vae.device, self.vae.dtype)).float()

    def image_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Latents of the batch's images; in training without augmentation, encoded once per
        sample_id and cached (the autoencoder is frozen and its latents deterministic)."""
        x = batch["pixel_values"]
        cacheable = self.training and self.hparams.cache_latents and "sample_id" in batch
        if not cacheable or self.augments_images:
            return self.encode_images(x)
        latents = cached_by_id(
            self._latent_cache, batch["sample_id"], lambda rows: self.encode_images(x[rows])
        )
        return latents.to(self.device)

    # --- training -----------------------------------------------------------------------------
    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # The EMA follows each optimizer step here, not in on_train_batch_end: the Trainer runs
        # callbacks' on_train_batch_end (ModelCheckpoint) first, so a step-N checkpoint would
        # hold the EMA of step N-1 and a resumed run would lose one update.
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            self.ema.update(self._trained_parts())

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]  # (LoRA: the adapters)
        hp = self.hparams
        opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        return self.warmup_schedule(opt)

    def configure_model(self) -> None:
        """Under Lightning's `ModelParallelStrategy` (a device mesh is set), shard the trained
        parts over its data-parallel ranks (`models.sharding`); under any other strategy,
        nothing."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from lightning_mia.models.sharding import data_parallel_mesh, shard_trained_parts

        mesh = data_parallel_mesh(mesh, self.trainer.strategy, ema=self.ema is not None)
        shard_trained_parts(self, self._trained_parts().values(), mesh)
        self.generates_on_every_rank = True
        # resuming, the sharded loader asks every key of the module of the checkpoint, but the
        # frozen autoencoder is never in one (`frozen_prefix`); the run card still refuses a
        # checkpoint of another family or autoencoder (on_load_checkpoint)
        self.strict_loading = False

    def _frozen_parts(self) -> list[nn.Module]:
        """Parts that stay in eval mode while training (the autoencoder, frozen encoders)."""
        return [self.vae]

    def train(self, mode: bool = True) -> LatentTextToImageModule:
        """The frozen parts always stay in eval mode."""
        super().train(mode)
        for part in self._frozen_parts():
            part.eval()
        return self

    # --- sampling ------------------------------------------------------------------------------
    @abstractmethod
    def sample_batch(
        self, captions: list[str], seeds: list[int], num_images: int, steps: int, scale: float
    ) -> torch.Tensor:
        """Images (B, N, 3, H, W) in [-1, 1] of one batch of captions, seeded per caption."""

    @torch.no_grad()
    def generate(
        self,
        captions: list[str],
        num_images: int = 4,
        seed: int | Sequence[int] = 0,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        """Images (B, N, 3, H, W) in [-1, 1]; caption i's images depend only on its seed."""
        steps = num_inference_steps or self.hparams.num_inference_steps
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        seeds = caption_seeds(len(captions), seed)
        per_loop = max(1, self.hparams.generation_batch_size // max(1, num_images))
        chunks = [
            self.sample_batch(
                captions[i : i + per_loop], seeds[i : i + per_loop], num_images, steps, scale
            )
            for i in range(0, len(captions), per_loop)
        ]
        empty = torch.empty(0, num_images, 3, self.resolution, self.resolution)
        return torch.cat(chunks) if chunks else empty

    # --- checkpoints --------------------------------------------------------------------------
    def vae_fingerprint(self) -> str:
        """Hash of the autoencoder's weights: a checkpoint refuses a different autoencoder."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the card; the base keeps `vae.` weights out
        if CARD_KEY in checkpoint:
            record_references(self, checkpoint[CARD_KEY])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        check_references(self, RunCard.from_dict(checkpoint[CARD_KEY]))
