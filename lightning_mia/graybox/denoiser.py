"""The latent-diffusion denoiser as the gray-box signals query it: fixed noise, the model's parts,
eps/x0 from any prediction type, classifier-free guidance, and the inputs shared by the signals.

    view = DiffusionView(model)              # EMA UNet + text encoder, frozen autoencoder
    x0, cond = view.latents(images), view.condition(captions)
    eps, x0_hat = view.eps_x0(x_t, t, cond)

Every signal works in the model's latent space (`x0` = the frozen autoencoder's scaled latents of
the query image: the VQ pre-quantisation latents or the KL posterior mean; the references encode
with `latent_dist.sample()`, a random draw, which we leave out so a query is deterministic) with
the caption's conditioning. Noise is fixed per sample and timestep: drawn from a generator seeded
by (seed, sample_id, t), so the target and every shadow see the same noise for a sample, whatever
the batch and whatever other timesteps are asked for. The model's output is converted to noise
(eps) and clean-latent (x0) predictions whatever its `prediction_type` (epsilon, v_prediction or
sample). The signals, each declared (`register_signal`) beside its code: `loss` in
`graybox/diffusion.py`, `secmi`, `pia` and `clid` in `graybox/secmi.py`, `pia.py`, `clid.py`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from lightning_mia.models.base import per_caption_randn
from lightning_mia.models.vae import encode_latents

SEED_STRIDE = 2**32
NULL_CAPTION = ""  # the unconditional path: what caption dropout trains (`drop_captions`)


# --- fixed noise ----------------------------------------------------------------------------------
def noise_seeds(seed: int, sample_ids: torch.Tensor) -> list[int]:
    """One seed per sample, a function of (seed, sample_id) only."""
    return [(seed * SEED_STRIDE + int(s)) % 2**63 for s in sample_ids.reshape(-1).tolist()]


def timestep_seed(sample_seed: int, t: int) -> int:
    """The noise seed of one (sample, timestep): independent of the other timesteps asked for."""
    digest = hashlib.blake2b(f"{sample_seed}:{t}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def fixed_noise(seeds: Sequence[int], t: int, shape: Sequence[int], device: Any) -> torch.Tensor:
    """Gaussian noise (B, *shape) for timestep t, sample i's slice from its own generator."""
    return per_caption_randn([timestep_seed(s, t) for s in seeds], shape, device)


# --- the model's parts ----------------------------------------------------------------------------
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


def guided(pred: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of a stacked (2B, ...) prediction [unconditional; conditional]:
    u + scale·(c - u), (B, ...); with scale 1 the input is the conditional (B, ...) alone."""
    if scale == 1.0:
        return pred
    uncond, cond = pred.chunk(2)
    return uncond + scale * (cond - uncond)


class DiffusionView:
    """The released denoiser of a `LatentDiffusionModule` as the signals query it: its UNet and
    text encoder (the EMA copies when EMA is on, like `per_sample_loss` in eval mode), its
    frozen autoencoder and its training noise schedule."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.unet, self.text_encoder = model.denoiser(use_ema=True)
        self.device = model.device
        self.alphas = model.noise_scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.prediction_type = str(model.noise_scheduler.config.prediction_type)

    def alpha_bar(self, t: int, batch_size: int) -> torch.Tensor:
        """Cumulative signal level ᾱ_t, (B, 1, 1, 1) float32."""
        return self.alphas[t].reshape(1, 1, 1, 1).expand(batch_size, 1, 1, 1)

    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Scaled latents x0 (B, C, h, w) of query images (B, 3, R, R) in [-1, 1]."""
        r = self.model.resolution
        if tuple(pixel_values.shape[-2:]) != (r, r):
            raise ValueError(
                f"images are {tuple(pixel_values.shape[-2:])} but the model is configured for "
                f"resolution {r}: set data.resolution to match"
            )
        vae = self.model.vae
        return encode_latents(vae, pixel_values.to(self.device, vae.dtype)).float()

    def condition(self, captions: Sequence[str]) -> torch.Tensor:
        """Text conditioning (B, S, D) of captions, as the model computes it."""
        return self.model.encode_text(list(captions), self.text_encoder).float()

    def guidance_condition(self, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """What `guided` expects: [null caption; cond] (2B, S, D), or cond (B, S, D) at scale 1."""
        if scale == 1.0:
            return cond
        return torch.cat([self.condition([NULL_CAPTION] * cond.shape[0]), cond])

    def predict(self, x_t: torch.Tensor, t: int, cond: torch.Tensor) -> torch.Tensor:
        """The UNet's raw output (B, C, h, w) at noisy latents x_t, timestep t."""
        t_batch = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        dtype = self.unet.dtype
        out = self.unet(x_t.to(dtype), t_batch, encoder_hidden_states=cond.to(dtype)).sample
        return out.float()

    def eps_x0(
        self, x_t: torch.Tensor, t: int, cond: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One UNet pass: noise and clean-latent predictions, (B, C, h, w) each."""
        abar = self.alpha_bar(t, x_t.shape[0])
        return split_prediction(self.predict(x_t, t, cond), x_t, abar, self.prediction_type)

    def denoise_eps(
        self, x0: torch.Tensor, cond: torch.Tensor, t: int, noise: torch.Tensor
    ) -> torch.Tensor:
        """eps_θ (B, C, h, w) at x0 noised to t with `noise`, by the model's own `denoise` (the
        one definition of its training loss); cond may stack k conditions (kB, S, D) for the
        same x0 and noise (B, C, h, w), the output then stacks k predictions (kB, C, h, w)."""
        k = cond.shape[0] // x0.shape[0]
        x0, noise = x0.repeat(k, 1, 1, 1), noise.repeat(k, 1, 1, 1)
        t_batch = torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long)
        out = self.model.denoise(x0, cond, t_batch, noise, self.unet)
        abar = self.alpha_bar(t, x0.shape[0])
        return split_prediction(out.prediction.float(), out.noisy, abar, self.prediction_type)[0]


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.flatten(1).mean(dim=1)


# --- shared inputs --------------------------------------------------------------------------------
def prepared(model: Any, batch: dict[str, Any], cache: dict[str, Any] | None) -> dict[str, Any]:
    """The view, latents and conditioning of a batch, computed once per `compute_signals`."""
    cache = {} if cache is None else cache
    if "view" not in cache:
        view = cache["view"] = DiffusionView(model)
        cache["x0"] = view.latents(batch["pixel_values"])  # (B, C, h, w)
        cache["cond"] = view.condition(batch["caption"])  # (B, S, D)
    return cache


def timestep_problems(name: str, timesteps: Sequence[int], n_train: int) -> list[str]:
    """Problems with an option of diffusion timesteps (0 <= t < n_train each, at least one)."""
    if not timesteps:
        return [f"{name} is empty"]
    bad = [t for t in timesteps if not (isinstance(t, int) and 0 <= t < n_train)]
    if bad:
        valid = f"0 <= t < num_train_timesteps = {n_train}"
        return [f"{name} {bad} out of the scheduler's range ({valid})"]
    return []
