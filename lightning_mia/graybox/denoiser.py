"""A continuous-latent model as the gray-box signals query it, through the family interface
(`models.latent.LatentTextToImageModule`): fixed noise, noise/clean-latent predictions, guidance,
deterministic moves along the model's own prediction, and the inputs shared by the signals.

    view = LatentView(model)                 # any family implementing models.latent
    x0, cond = view.latents(images), view.condition(captions)
    eps, x0_hat = view.eps_x0(x_t, t, cond)  # (B, C, h, w) each; t a time of model.time_grid
    x_next = view.move(x_t, t, t_next, cond) # DDIM step (diffusion), Euler step (flow)

Every signal works in the model's latent space (`x0` = the frozen autoencoder's scaled latents of
the query image: the VQ pre-quantisation latents or the KL posterior mean; the references encode
with `latent_dist.sample()`, a random draw, which we leave out so a query is deterministic) with
the caption's conditioning. Noise is fixed per sample and time: drawn from a generator seeded
by (seed, sample_id, t), so the target and every shadow see the same noise for a sample, whatever
the batch and whatever other times are asked for. The model's output is converted to noise (eps)
and clean-latent (x0) predictions by the model itself (`split_prediction`: any diffusion
prediction type, or a flow velocity). The view holds no family knowledge: the diffusion signals
(`loss` in `graybox/diffusion.py`, `secmi`, `pia`, `clid` in `graybox/secmi.py`, `pia.py`,
`clid.py`) and the flow signals (`graybox/flow.py`) all query their model through it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_mia.graybox.encodings import encode_once
from lightning_mia.models.base import per_caption_randn
from lightning_mia.models.latent import NULL_CAPTION, Conditioning, LatentTextToImageModule

SEED_STRIDE = 2**32
# rows of one stacked network pass (times x conditions x samples): a GPU fills up with many; on a
# CPU the tiny MMDiT costs the same per row from 16 to 64 rows and 20% more at 128 (measured 1.77
# vs 2.16 ms a row, 2 threads), its attention maps then leaving the caches; the tiny UNet costs
# 25% less per row at 64 rows than at 32
ROWS_PER_PASS = {"cuda": 1024, "cpu": 64}


# --- fixed noise ----------------------------------------------------------------------------------
def noise_seeds(seed: int, sample_ids: torch.Tensor) -> list[int]:
    """One seed per sample, a function of (seed, sample_id) only."""
    return [(seed * SEED_STRIDE + int(s)) % 2**63 for s in sample_ids.reshape(-1).tolist()]


def timestep_seed(sample_seed: int, t: float) -> int:
    """The noise seed of one (sample, time): independent of the other times asked for."""
    digest = hashlib.blake2b(f"{sample_seed}:{t}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def fixed_noise(seeds: Sequence[int], t: float, shape: Sequence[int], device: Any) -> torch.Tensor:
    """Gaussian noise (B, *shape) for time t, sample i's slice from its own generator."""
    return per_caption_randn([timestep_seed(s, t) for s in seeds], shape, device)


# --- the model, through its interface -------------------------------------------------------------
def guided(pred: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance of a stacked (2B, ...) prediction [unconditional; conditional]:
    u + scale·(c - u), (B, ...); with scale 1 the input is the conditional (B, ...) alone."""
    if scale == 1.0:
        return pred
    uncond, cond = pred.chunk(2)
    return uncond + scale * (cond - uncond)


class LatentView:
    """The released model (EMA weights when EMA is on: it is queried in eval mode) as the signals
    query it. Times `t` are plain numbers on the model's `time_grid` (an int timestep for
    diffusion, a noise level in [0, 1] for flow); the view makes the (B,) tensors."""

    def __init__(self, model: LatentTextToImageModule) -> None:
        self.model = model
        self.device = model.device
        self.grid = model.time_grid
        self._null: Conditioning | None = None

    def times(self, t: float, batch_size: int) -> torch.Tensor:
        """Time t as the model takes it, (B,)."""
        return self.grid.full(batch_size, t, self.device)

    def latents(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Scaled latents x0 (B, C, h, w) of query images (B, 3, R, R) in [-1, 1]."""
        return encode_once(self.model, pixel_values.to(self.device))  # once for every model

    def condition(self, captions: Sequence[str]) -> Conditioning:
        """Caption conditioning of B captions, as the model computes it."""
        return self.model.condition(list(captions))

    def null_condition(self, batch_size: int) -> Conditioning:
        """The null caption's conditioning, B rows: encoded once per view (one row), repeated."""
        if self._null is None:
            self._null = self.condition([NULL_CAPTION])
        return self._null.repeat(batch_size)

    def guidance_condition(self, cond: Conditioning, scale: float) -> Conditioning:
        """What `guided` expects: [null caption; cond] (2B rows), or cond (B) at scale 1."""
        if scale == 1.0:
            return cond
        return Conditioning.cat([self.null_condition(len(cond)), cond])

    def predict(self, x_t: torch.Tensor, t: float, cond: Conditioning) -> torch.Tensor:
        """The network's raw output (B, C, h, w) float32 at latents x_t, time t."""
        return self.model.predict(x_t, self.times(t, x_t.shape[0]), cond)

    def eps_x0(
        self, x_t: torch.Tensor, t: float, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One network pass: noise and clean-latent predictions, (B, C, h, w) each."""
        times = self.times(t, x_t.shape[0])
        return self.model.split_prediction(self.model.predict(x_t, times, cond), x_t, times)

    def move(self, x_t: torch.Tensor, t: float, t_next: float, cond: Conditioning) -> torch.Tensor:
        """One deterministic step from t to t_next (either direction) along the model's own
        prediction: x' = noised(x0_hat, eps_hat, t_next). For diffusion a DDIM step (eta 0),
        sqrt(ᾱ')·x0_hat + sqrt(1 - ᾱ')·eps_hat; for flow matching the Euler step
        (1 - t')·x0_hat + t'·eps_hat = x_t + (t' - t)·v."""
        eps, x0_hat = self.eps_x0(x_t, t, cond)
        return self.model.noised(x0_hat, eps, self.times(t_next, x_t.shape[0]))

    def denoise_eps(
        self, x0: torch.Tensor, cond: Conditioning, t: float, noise: torch.Tensor
    ) -> torch.Tensor:
        """eps_θ (B, C, h, w) at x0 noised to t with `noise`, by the model's own `noised` and
        `predict` (its training loss's pieces); cond may stack k conditions (kB rows) for the
        same x0 and noise (B, C, h, w), the output then stacks k predictions (kB, C, h, w)."""
        k = len(cond) // x0.shape[0]
        x0, noise = x0.repeat(k, 1, 1, 1), noise.repeat(k, 1, 1, 1)
        times = self.times(t, x0.shape[0])
        x_t = self.model.noised(x0, noise, times)
        return self.model.split_prediction(self.model.predict(x_t, times, cond), x_t, times)[0]


def per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the first: (B, ...) -> (B,)."""
    return x.flatten(1).mean(dim=1)


# --- stacked passes -------------------------------------------------------------------------------
def rows_per_pass(device: torch.device) -> int:
    """How many rows one stacked network pass takes on `device`."""
    return ROWS_PER_PASS.get(torch.device(device).type, ROWS_PER_PASS["cuda"])


def in_chunks(
    n: int, device: torch.device, run: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`run(rows)` over rows 0 .. n-1 (a long tensor of row indices) in even chunks of at most
    `rows_per_pass(device)` rows, the outputs concatenated along the first dimension."""
    chunks = max(1, -(-n // rows_per_pass(device)))
    size = -(-n // chunks)
    rows = torch.arange(n, device=device)
    return torch.cat([run(rows[i : i + size]) for i in range(0, n, size)])


def take(cond: Conditioning, rows: torch.Tensor) -> Conditioning:
    """The given rows (a long tensor of indices) of a conditioning."""
    return Conditioning(tuple(p[rows.to(p.device)] for p in cond.parts))


def stacked_losses(
    view: LatentView,
    x0: torch.Tensor,
    conds: Sequence[Conditioning],
    times: Sequence[float],
    seeds: Sequence[int],
    eps_error: bool = False,
) -> torch.Tensor:
    """Training losses (T, K, B) of latents x0 (B, C, h, w) at T times under K conditionings
    (B rows each), the model's own `loss_at` (MSE to its training target, mean over the latent),
    the noise fixed per (sample, t) and shared by every condition; with `eps_error`, (2, T, K, B):
    the losses, then the noise-space errors ||eps - eps_θ||² of the same passes. The T·K·B rows
    (t, k, b) go through the network stacked, `in_chunks`."""
    model, b, k, n_t = view.model, x0.shape[0], len(conds), len(times)
    noise = torch.stack([fixed_noise(seeds, t, x0.shape[1:], x0.device) for t in times])
    t_all = torch.cat([view.times(t, k * b) for t in times])  # (T*K*B,) in the grid's dtype
    cond = Conditioning.cat(list(conds))  # (K*B) rows, (k, b)

    def run(rows: torch.Tensor) -> torch.Tensor:
        sample, t_rows = rows % b, t_all[rows]
        eps = noise[rows // (k * b), sample]
        denoised = model.loss_at(x0[sample], take(cond, rows % (k * b)), t_rows, eps)
        if not eps_error:
            return denoised.loss[:, None]
        eps_hat = model.split_prediction(denoised.prediction, denoised.noisy, t_rows)[0]
        return torch.stack([denoised.loss, per_sample_mean((eps_hat - eps) ** 2)], dim=1)

    out = in_chunks(n_t * k * b, x0.device, run)  # (T*K*B, 1 or 2)
    out = out.T.reshape(-1, n_t, k, b)
    return out if eps_error else out[0]


def stacked_predict(
    view: LatentView, x_t: torch.Tensor, times: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """The network's output (N, C, h, w) at N rows of (x_t, time, condition), `in_chunks`."""
    return in_chunks(
        x_t.shape[0],
        x_t.device,
        lambda rows: view.model.predict(x_t[rows], times[rows], take(cond, rows)),
    )


# --- shared inputs --------------------------------------------------------------------------------
def prepared(model: Any, batch: dict[str, Any], cache: dict[str, Any] | None) -> dict[str, Any]:
    """The view, latents and conditioning of a batch, computed once per `compute_signals`."""
    cache = {} if cache is None else cache
    if "view" not in cache:
        view = cache["view"] = LatentView(model)
        cache["x0"] = view.latents(batch["pixel_values"])  # (B, C, h, w)
        cache["cond"] = view.condition(batch["caption"])  # B captions' Conditioning
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
