"""Gray-box membership signals of the latent-diffusion family: loss, SecMI, PIA and CLiD.

    from lightning_mia.graybox import compute_signals
    feats = compute_signals(model, batch, ["loss", "secmi", "pia", "clid"], seed=0)

Every signal works in the model's latent space (`x0` = the frozen autoencoder's scaled latents of
the query image) with the caption's conditioning, and returns raw per-sample statistics; which
direction means "member" is learned by the attack stage on shadow models (the expected direction
is in each docstring). Noise is fixed per sample and timestep: it is drawn from a generator
seeded by (seed, sample_id, t), so the target and every shadow see the same noise for a sample,
whatever the batch and whatever other timesteps are asked for. The model's output is converted
to noise (eps) and clean-latent (x0) predictions whatever its `prediction_type` (epsilon,
v_prediction or sample).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from lightning_mia.graybox.spec import SignalOptions, SignalSpec, register_signal
from lightning_mia.models.base import per_caption_randn
from lightning_mia.models.vae import encode_latents

SEED_STRIDE = 2**32


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


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)  # (B,)


# --- shared inputs --------------------------------------------------------------------------------
def prepared(model: Any, batch: dict[str, Any], cache: dict[str, Any] | None) -> dict[str, Any]:
    """The view, latents and conditioning of a batch, computed once per `compute_signals`."""
    cache = {} if cache is None else cache
    if "view" not in cache:
        view = cache["view"] = DiffusionView(model)
        cache["x0"] = view.latents(batch["pixel_values"])  # (B, C, h, w)
        cache["cond"] = view.condition(batch["caption"])  # (B, S, D)
    return cache


# --- loss (Matsumoto et al. 2023; Hu & Pang 2023) -------------------------------------------------
def loss_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    timesteps: Sequence[int],
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample denoising loss at fixed timesteps and fixed noise. Lower = member.

    `loss/t{t}`: the model's own training loss (`LatentDiffusionModule.denoise(...).loss`, the
    one `per_sample_loss` takes the mean of in training, here with this t and noise: MSE to its
    training target, e.g. v); `loss/eps_t{t}`: the error in noise space, ||eps - eps_θ||² (for
    v-prediction it is ᾱ_t times the v-loss, so only the means differ); `loss/mean` and
    `loss/eps_mean` over timesteps. One UNet pass per timestep.
    """
    c = prepared(model, batch, cache)
    view, x0, cond = c["view"], c["x0"], c["cond"]
    b = x0.shape[0]
    seeds = noise_seeds(seed, batch["sample_id"])
    out: dict[str, torch.Tensor] = {}
    for t in timesteps:
        noise = fixed_noise(seeds, t, x0.shape[1:], x0.device)  # (B, C, h, w)
        t_batch = torch.full((b,), t, device=x0.device, dtype=torch.long)
        denoised = model.denoise(x0, cond, t_batch, noise, view.unet)
        abar = view.alpha_bar(t, b)
        eps, _ = split_prediction(
            denoised.prediction.float(), denoised.noisy, abar, view.prediction_type
        )
        out[f"loss/t{t}"] = denoised.loss
        out[f"loss/eps_t{t}"] = _per_sample_mean((eps - noise) ** 2)
    out["loss/mean"] = torch.stack([out[f"loss/t{t}"] for t in timesteps]).mean(0)
    out["loss/eps_mean"] = torch.stack([out[f"loss/eps_t{t}"] for t in timesteps]).mean(0)
    return out


# --- SecMI (Duan et al., ICML 2023) ---------------------------------------------------------------
def ddim_move(
    view: DiffusionView, x: torch.Tensor, t: int, t_next: int, cond: torch.Tensor
) -> torch.Tensor:
    """One deterministic DDIM step from timestep t to t_next (either direction), guidance 1.

    x_{t'} = sqrt(ᾱ_{t'})·x0_θ(x_t, t) + sqrt(1 - ᾱ_{t'})·eps_θ(x_t, t).
    """
    eps, x0_hat = view.eps_x0(x, t, cond)
    abar = view.alpha_bar(t_next, x.shape[0])
    return abar.sqrt() * x0_hat + (1 - abar).sqrt() * eps


def _step_size(t: int, num_steps: int) -> int:
    if num_steps < 1 or t <= 0 or t % num_steps:
        raise ValueError(f"timestep {t} must be a positive multiple of num_steps {num_steps}")
    return t // num_steps


def ddim_invert(
    view: DiffusionView, x0: torch.Tensor, cond: torch.Tensor, t_end: int, num_steps: int
) -> torch.Tensor:
    """Deterministic DDIM inversion of clean latents x0 (B, C, h, w) from timestep 0 to t_end in
    `num_steps` equal steps (x0 is taken as the sample at timestep 0)."""
    delta = _step_size(t_end, num_steps)
    x = x0
    for t in range(0, t_end, delta):
        x = ddim_move(view, x, t, t + delta, cond)
    return x


def ddim_reverse(
    view: DiffusionView, x_t: torch.Tensor, cond: torch.Tensor, t_start: int, num_steps: int
) -> torch.Tensor:
    """Deterministic DDIM sampling from timestep t_start back to 0 in `num_steps` equal steps."""
    delta = _step_size(t_start, num_steps)
    x = x_t
    for t in range(t_start, 0, -delta):
        x = ddim_move(view, x, t, t - delta, cond)
    return x


def secmi_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    t_sec: int = 100,
    num_steps: int = 10,
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """SecMI t-error: invert x0 to t_sec by DDIM, denoise one step and re-noise. Lower = member.

    With Δ = t_sec / num_steps, x̃ = DDIM-inversion(x0 → t_sec); x' = ψ(φ(x̃, t_sec), t_sec - Δ)
    where φ is one deterministic denoise step t_sec → t_sec - Δ and ψ one deterministic step
    back. `secmi/t_error` = mean over the latent of (x' - x̃)² (the paper's ||·||² divided by
    the latent size); the error map summed over channels gives `secmi/err_max` and
    `secmi/err_p90` over latent positions. Conditional path (the true caption), guidance 1.
    Deterministic: no noise, `seed` is unused. num_steps + 2 UNet passes.
    """
    c = prepared(model, batch, cache)
    view, x0, cond = c["view"], c["x0"], c["cond"]
    delta = t_sec // num_steps
    x_sec = ddim_invert(view, x0, cond, t_sec, num_steps)  # (B, C, h, w) at t_sec
    x_prev = ddim_move(view, x_sec, t_sec, t_sec - delta, cond)
    x_back = ddim_move(view, x_prev, t_sec - delta, t_sec, cond)
    err = (x_back - x_sec) ** 2  # (B, C, h, w)
    err_map = err.sum(dim=1).flatten(1)  # (B, h*w)
    return {
        "secmi/t_error": _per_sample_mean(err),
        "secmi/err_max": err_map.max(dim=1).values,
        "secmi/err_p90": torch.quantile(err_map, 0.9, dim=1),
    }


# --- PIA (Kong et al., ICLR 2024) -----------------------------------------------------------------
def pia_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    timesteps: Sequence[int],
    p: float = 1.0,
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """PIA: the model's noise at t=0 as the proximal initialisation. Lower = member.

    eps0 = eps_θ(x0, 0, c); x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·eps0; `pia/t{t}` =
    (mean |eps0 - eps_θ(x_t, t, c)|^p)^(1/p), the p-norm divided by (latent size)^(1/p);
    `pia/mean` over timesteps. Deterministic (`seed` unused); 1 + len(timesteps) UNet passes.
    """
    c = prepared(model, batch, cache)
    view, x0, cond = c["view"], c["x0"], c["cond"]
    eps0, _ = view.eps_x0(x0, 0, cond)
    out: dict[str, torch.Tensor] = {}
    for t in timesteps:
        abar = view.alpha_bar(t, x0.shape[0])
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps0
        eps_t, _ = view.eps_x0(x_t, t, cond)
        out[f"pia/t{t}"] = _per_sample_mean((eps0 - eps_t).abs() ** p) ** (1.0 / p)
    out["pia/mean"] = torch.stack([out[f"pia/t{t}"] for t in timesteps]).mean(0)
    return out


# --- CLiD (Zhai et al., NeurIPS 2024) -------------------------------------------------------------
def reduce_caption(caption: str, keep_fraction: float) -> str:
    """The caption truncated to its first floor(keep_fraction · words) words."""
    words = caption.split()
    return " ".join(words[: int(len(words) * keep_fraction)])


def clid_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    timesteps: Sequence[int],
    weight: float = 1.0,
    keep_fraction: float = 0.5,
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """CLiD: conditional likelihood discrepancy. Gaps and score: higher = member (the paper's
    direction); loss: lower = member. (A tiny model that memorises its members outright also
    memorises them through the null caption: there the gaps are near chance, the score works
    through its loss term.)

    At each t and the same fixed noise as `loss`, the noise-space error ℓ(c) = ||eps -
    eps_θ(x_t, t, c)||² (mean over the latent) for the true caption c, the null caption "" and
    the reduced caption (first `keep_fraction` of the words). Averaged over timesteps:
    `clid/loss_cond` = ℓ(c), `clid/gap_null` = ℓ("") - ℓ(c), `clid/gap_reduced` = ℓ(c_red) -
    ℓ(c), and `clid/score` = mean of the two gaps - weight · ℓ(c), the paper's CLiD_th
    combination of discrepancy and likelihood (its robust scaling of each term is left to the
    attack stage, which also sees the terms separately). 3 UNet passes per timestep.
    """
    c = prepared(model, batch, cache)
    view, x0, cond = c["view"], c["x0"], c["cond"]
    b = x0.shape[0]
    reduced = [reduce_caption(s, keep_fraction) for s in batch["caption"]]
    null_and_reduced = view.condition([""] * b + reduced)  # (2B, S, D)
    conds = torch.cat([cond, null_and_reduced])  # (3B, S, D): true, null, reduced
    seeds = noise_seeds(seed, batch["sample_id"])
    losses = []
    for t in timesteps:
        noise = fixed_noise(seeds, t, x0.shape[1:], x0.device)  # (B, C, h, w)
        abar = view.alpha_bar(t, b)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        eps, _ = view.eps_x0(x_t.repeat(3, 1, 1, 1), t, conds)  # (3B, C, h, w)
        losses.append(_per_sample_mean((eps - noise.repeat(3, 1, 1, 1)) ** 2).reshape(3, b))
    loss_cond, loss_null, loss_red = torch.stack(losses).mean(0)  # (B,) each
    gap_null, gap_reduced = loss_null - loss_cond, loss_red - loss_cond
    return {
        "clid/loss_cond": loss_cond,
        "clid/gap_null": gap_null,
        "clid/gap_reduced": gap_reduced,
        "clid/score": 0.5 * (gap_null + gap_reduced) - weight * loss_cond,
    }


# --- the signals' declarations (each also declares its gray-box attack) -----------------------
def _timestep_problems(o: SignalOptions, n_train: int) -> list[str]:
    if not o.timesteps:
        return ["timesteps is empty"]
    bad = [t for t in o.timesteps if not (isinstance(t, int) and 0 <= t < n_train)]
    if bad:
        valid = f"0 <= t < num_train_timesteps = {n_train}"
        return [f"timesteps {bad} out of the scheduler's range ({valid})"]
    return []


def _secmi_problems(o: SignalOptions, n_train: int) -> list[str]:
    problems = []
    if not 0 < o.secmi_t < n_train:
        problems.append(f"secmi_t {o.secmi_t} out of the scheduler's range (0 < t < {n_train})")
    if o.secmi_steps < 1 or o.secmi_t % o.secmi_steps:
        problems.append(
            f"secmi_t {o.secmi_t} must be a positive multiple of secmi_steps {o.secmi_steps}"
        )
    return problems


def _pia_problems(o: SignalOptions, n_train: int) -> list[str]:
    problems = _timestep_problems(o, n_train)
    return problems + ([] if o.pia_p > 0 else [f"pia_p must be > 0, got {o.pia_p}"])


def _clid_problems(o: SignalOptions, n_train: int) -> list[str]:
    problems = _timestep_problems(o, n_train)
    if o.clid_weight < 0:
        problems.append(f"clid_weight must be >= 0, got {o.clid_weight}")
    if not 0 < o.clid_keep_fraction < 1:
        problems.append(f"clid_keep_fraction must be in (0, 1), got {o.clid_keep_fraction}")
    return problems


register_signal(
    SignalSpec(
        "loss",
        "diffusion",
        lambda m, b, s, o, c: loss_signals(m, b, s, o.timesteps, c),
        lambda o: len(o.timesteps),
        "per-sample denoising loss at fixed timesteps and noise (Matsumoto et al. 2023)",
        score_feature="loss/mean",
        check=_timestep_problems,
    )
)
register_signal(
    SignalSpec(
        "secmi",
        "diffusion",
        lambda m, b, s, o, c: secmi_signals(m, b, s, o.secmi_t, o.secmi_steps, c),
        lambda o: o.secmi_steps + 2,
        "SecMI t-error after DDIM inversion to t_sec (Duan et al. ICML 2023)",
        score_feature="secmi/t_error",
        check=_secmi_problems,
    )
)
register_signal(
    SignalSpec(
        "pia",
        "diffusion",
        lambda m, b, s, o, c: pia_signals(m, b, s, o.timesteps, o.pia_p, c),
        lambda o: 1 + len(o.timesteps),
        "PIA: noise prediction at t=0 as proximal initialisation (Kong et al. ICLR 2024)",
        score_feature="pia/mean",
        check=_pia_problems,
    )
)
register_signal(
    SignalSpec(
        "clid",
        "diffusion",
        lambda m, b, s, o, c: clid_signals(
            m, b, s, o.timesteps, o.clid_weight, o.clid_keep_fraction, c
        ),
        lambda o: 3 * len(o.timesteps),
        "CLiD: loss with null / reduced caption minus loss with the caption (Zhai et al. 2024)",
        score_feature="clid/score",
        check=_clid_problems,
    )
)
