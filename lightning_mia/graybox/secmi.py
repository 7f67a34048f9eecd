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
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_mia.graybox.denoiser import DiffusionView, per_sample_mean, prepared
from lightning_mia.graybox.spec import SignalOptions, SignalSpec, register_signal


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
    `num_steps` equal steps (x0 is taken as the sample at timestep 0, as the reference does)."""
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


def secmi_round_trip(
    view: DiffusionView, x0: torch.Tensor, cond: torch.Tensor, t_sec: int, num_steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̃, x') at t_sec - Δ, (B, C, h, w) each: the inverted latents and their reconstruction
    after one step up to t_sec and one step back down (the reference's order)."""
    delta = _step_size(t_sec, num_steps)
    t_ref = t_sec - delta
    x_ref = ddim_invert(view, x0, cond, t_ref, num_steps - 1) if t_ref > 0 else x0
    x_up = ddim_move(view, x_ref, t_ref, t_sec, cond)  # x̃_{t_sec}
    return x_ref, ddim_move(view, x_up, t_sec, t_ref, cond)


def secmi_features(
    view: DiffusionView, x0: torch.Tensor, cond: torch.Tensor, t_sec: int, num_steps: int
) -> dict[str, torch.Tensor]:
    """`secmi/t_error`, `secmi/err_max`, `secmi/err_p90` (B,) of latents x0 (B, C, h, w)."""
    x_ref, x_back = secmi_round_trip(view, x0, cond, t_sec, num_steps)
    err = (x_back - x_ref) ** 2  # (B, C, h, w)
    err_map = err.sum(dim=1).flatten(1)  # (B, h*w)
    return {
        "secmi/t_error": per_sample_mean(err),
        "secmi/err_max": err_map.max(dim=1).values,
        "secmi/err_p90": torch.quantile(err_map, 0.9, dim=1),
    }


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
