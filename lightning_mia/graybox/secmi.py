"""SecMI (Duan et al., "Are Diffusion Models Vulnerable to Membership Inference Attacks?",
ICML 2023): the t-error of a deterministic DDIM round trip. Lower = member.

    feats = compute_signals(model, batch, ["secmi"], seed=0, options=SignalOptions(secmi_t=100))

The order is the reference code's (github jinhaoduan/SecMI, `mia_evals/secmia.py`,
`get_intermediate_results`; the same in jinhaoduan/SecMI-LDM, `src/mia/secmi.py`, for Stable
Diffusion): with Δ = t_sec / num_steps, invert x0 deterministically (DDIM, η = 0) from timestep 0
to t_sec - Δ in steps of Δ (x̃ = x̃_{t_sec-Δ}), take one more inversion step to t_sec, one
deterministic denoising step back to t_sec - Δ (x'), and compare at t_sec - Δ: t-error =
||x' - x̃||². The reference's defaults are t_sec = 100, Δ = 10 (num_steps = 10). Conditional path
(the true caption) at guidance 1, as SecMI-LDM runs its pipeline. num_steps + 1 UNet passes.

Remaining deviations: `secmi/t_error` is the mean over the latent, the reference's sum divided by
the latent size (a constant factor: same ranking, same calibration); SecMI_NNs trains a ResNet-18
on the |x' - x̃| map, for which we give the attack stage two summaries of the squared error map
summed over channels, its maximum and 90th percentile over latent positions.

t_sec is a timestep of the reference's linear schedule. On a memorised member the inversion
from the clean image adds too little noise (the model predicts little), so at a t_sec where the
model's schedule is still almost clean (the demo's cosine schedule: ᾱ = 0.977 at t = 90) the
round trip runs off distribution and members get the *larger* t-error; further up the paper's
direction returns (`benchmarks/secmi_direction.py`: AUC 0.001 at t_sec = 100, 0.77 at 300).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_mia.graybox.denoiser import LatentView, per_sample_mean, prepared
from lightning_mia.graybox.spec import SignalOptions, SignalSpec, register_signal
from lightning_mia.models.latent import Conditioning


def ddim_move(
    view: LatentView, x: torch.Tensor, t: int, t_next: int, cond: Conditioning
) -> torch.Tensor:
    """One deterministic DDIM step from timestep t to t_next (either direction), guidance 1.

    x_{t'} = sqrt(ᾱ_{t'})·x0_θ(x_t, t) + sqrt(1 - ᾱ_{t'})·eps_θ(x_t, t) (`LatentView.move`).
    """
    return view.move(x, t, t_next, cond)


def _step_size(t: int, num_steps: int) -> int:
    if num_steps < 1 or t <= 0 or t % num_steps:
        raise ValueError(f"timestep {t} must be a positive multiple of num_steps {num_steps}")
    return t // num_steps


def move_along(
    view: LatentView, x: torch.Tensor, cond: Conditioning, times: Sequence[float]
) -> torch.Tensor:
    """Deterministic moves from times[0] through each later time in turn (either direction)."""
    for t, t_next in zip(times[:-1], times[1:]):
        x = view.move(x, t, t_next, cond)
    return x


def ddim_invert(
    view: LatentView, x0: torch.Tensor, cond: Conditioning, t_end: int, num_steps: int
) -> torch.Tensor:
    """Deterministic DDIM inversion of clean latents x0 (B, C, h, w) from timestep 0 to t_end in
    `num_steps` equal steps (x0 is taken as the sample at timestep 0, as the reference does)."""
    delta = _step_size(t_end, num_steps)
    return move_along(view, x0, cond, list(range(0, t_end + 1, delta)))


def ddim_reverse(
    view: LatentView, x_t: torch.Tensor, cond: Conditioning, t_start: int, num_steps: int
) -> torch.Tensor:
    """Deterministic DDIM sampling from timestep t_start back to 0 in `num_steps` equal steps."""
    delta = _step_size(t_start, num_steps)
    return move_along(view, x_t, cond, list(range(t_start, -1, -delta)))


def round_trip(
    view: LatentView, x0: torch.Tensor, cond: Conditioning, times: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̃, x') at times[-2], (B, C, h, w) each: x0 moved deterministically along times[:-1]
    (x̃), then one step up to times[-1] and one step back down (x'): SecMI's order, on any
    family's time grid (times[0] = the clean end)."""
    x_ref = move_along(view, x0, cond, times[:-1])
    x_up = view.move(x_ref, times[-2], times[-1], cond)
    return x_ref, view.move(x_up, times[-1], times[-2], cond)


def secmi_round_trip(
    view: LatentView, x0: torch.Tensor, cond: Conditioning, t_sec: int, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̃, x') at t_sec - Δ, (B, C, h, w) each: the inverted latents and their reconstruction
    after one step up to t_sec and one step back down (the reference's order)."""
    delta = _step_size(t_sec, num_steps)
    return round_trip(view, x0, cond, list(range(0, t_sec + 1, delta)))


def t_error_features(prefix: str, x_ref: torch.Tensor, x_back: torch.Tensor) -> dict:
    """`<prefix>/t_error`, `/err_max`, `/err_p90` (B,) of a round trip's (x̃, x')."""
    err = (x_back - x_ref) ** 2  # (B, C, h, w)
    err_map = err.sum(dim=1).flatten(1)  # (B, h*w)
    return {
        f"{prefix}/t_error": per_sample_mean(err),
        f"{prefix}/err_max": err_map.max(dim=1).values,
        f"{prefix}/err_p90": torch.quantile(err_map, 0.9, dim=1),
    }


def secmi_features(
    view: LatentView, x0: torch.Tensor, cond: Conditioning, t_sec: int, num_steps: int
) -> dict[str, torch.Tensor]:
    """`secmi/t_error`, `secmi/err_max`, `secmi/err_p90` (B,) of latents x0 (B, C, h, w)."""
    return t_error_features("secmi", *secmi_round_trip(view, x0, cond, t_sec, num_steps))


def secmi_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    t_sec: int = 100,
    num_steps: int = 10,
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """SecMI's t-error of a batch (module docstring). Deterministic: `seed` is unused."""
    c = prepared(model, batch, cache)
    return secmi_features(c["view"], c["x0"], c["cond"], t_sec, num_steps)


def _secmi_problems(o: SignalOptions, n_train: int) -> list[str]:
    problems = []
    if not 0 < o.secmi_t < n_train:
        problems.append(f"secmi_t {o.secmi_t} out of the scheduler's range (0 < t < {n_train})")
    if o.secmi_steps < 1 or o.secmi_t % o.secmi_steps:
        problems.append(
            f"secmi_t {o.secmi_t} must be a positive multiple of secmi_steps {o.secmi_steps}"
        )
    return problems


register_signal(
    SignalSpec(
        "secmi",
        "diffusion",
        lambda m, b, s, o, c: secmi_signals(m, b, s, o.secmi_t, o.secmi_steps, c),
        lambda o: o.secmi_steps + 1,
        "SecMI t-error of a DDIM round trip at t_sec (Duan et al. ICML 2023)",
        score_feature="secmi/t_error",
        check=_secmi_problems,
        score_scale="log",  # a squared reconstruction error: positive, right-skewed
        calibrated_by=("complexity",),
    )
)
