"""PIA (Kong et al., "An Efficient Membership Inference Attack for the Diffusion Model by
Proximal Initialization", ICLR 2024): the model's own noise at t = 0 as the starting point of a
one-step round trip. Lower = member.

    feats = compute_signals(model, batch, ["pia"], seed=0, options=SignalOptions(pia_p=4.0))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_mia.graybox.denoiser import (
    LatentView,
    guided,
    in_chunks,
    per_sample_mean,
    prepared,
    take,
    timestep_problems,
)
from lightning_mia.graybox.spec import SignalOptions, SignalSpec, register_signal
from lightning_mia.models.latent import Conditioning


def pia_distance(eps0: torch.Tensor, eps_t: torch.Tensor, p: float) -> torch.Tensor:
    """Mean over the latent of |eps0 - eps_t|^p, (B, ...) -> (B,): the reference's
    `((x0 - x1).abs() ** lp).flatten(2).sum(-1)` divided by the latent size (no p-th root)."""
    return per_sample_mean((eps0 - eps_t).abs() ** p)


def stacked_eps(
    view: LatentView,
    x0: torch.Tensor,
    noise: torch.Tensor,
    conds: Conditioning,
    timesteps: Sequence[int],
) -> torch.Tensor:
    """eps_θ (T, kB, C, h, w) at x0 (B, C, h, w) noised with `noise` (B, C, h, w) to each of T
    timesteps, under conds of kB rows (the same x_t for each of its k row blocks): the T·kB rows
    (t, row of conds) through the network stacked, `in_chunks`."""
    model, b, kb = view.model, x0.shape[0], len(conds)
    t_all = torch.cat([view.times(t, kb) for t in timesteps])  # (T*kB,)

    def run(rows: torch.Tensor) -> torch.Tensor:
        sample, t_rows = rows % b, t_all[rows]
        x_t = model.noised(x0[sample], noise[sample], t_rows)
        out = model.predict(x_t, t_rows, take(conds, rows % kb))
        return model.split_prediction(out, x_t, t_rows)[0]

    return in_chunks(len(t_all), x0.device, run).reshape(len(timesteps), kb, *x0.shape[1:])


def pia_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    timesteps: Sequence[int],
    p: float = 4.0,
    guidance: float = 7.5,
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """PIA at each timestep t: `pia/t{t}`, and `pia/mean` over timesteps. Lower = member.

    As the reference code (github kong13661/PIA, `stable_diffusion/components.py`, class `PIA`,
    and `stable_attack.py`): eps0 = eps_θ(x0, 0, c), the model queried at timestep 0 on the
    clean latents with the caption; x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·eps0 (noised by the
    model's own `denoise`); `pia/t{t}` = mean |eps0 - eps_θ(x_t, t, c)|^p, p = 4 by default
    (the reference's `lp`). Both queries are classifier-free guided at `guidance` (the
    reference calls the Stable Diffusion pipeline at its default 7.5; 1 = conditional only);
    eps0 is not renormalised (that is the PIAN variant). Deterministic (`seed` unused);
    1 + len(timesteps) UNet passes, twice that with guidance, the timesteps' stacked.

    Remaining deviations: the reference sums over the latent (we take the mean: a constant
    factor) and reads each t as a separate attack (t = 10·k, k = 1..attack_num); we give each
    `pia/t{t}` to the attack stage plus `pia/mean` over timesteps, the score LiRA calibrates.
    Its Stable Diffusion script also applies the pixel normalisation x·2 - 1 to the latents and
    a linear β schedule of its own; we query the latents and schedule the model was trained on.
    """
    c = prepared(model, batch, cache)
    view, x0, cond = c["view"], c["x0"], c["cond"]
    conds = view.guidance_condition(cond, guidance)  # kB rows, k = 1 or 2
    k = len(conds) // x0.shape[0]
    eps0 = guided(view.eps_x0(x0.repeat(k, 1, 1, 1), 0, conds)[0], guidance)  # (B, C, h, w)
    eps_t = stacked_eps(view, x0, eps0, conds, timesteps)  # (T, kB, C, h, w)
    out = {
        f"pia/t{t}": pia_distance(eps0, guided(e, guidance), p) for t, e in zip(timesteps, eps_t)
    }
    out["pia/mean"] = torch.stack([out[f"pia/t{t}"] for t in timesteps]).mean(0)
    return out


def _pia_problems(o: SignalOptions, n_train: int) -> list[str]:
    problems = timestep_problems("timesteps", o.timesteps, n_train)
    if o.pia_p <= 0:
        problems.append(f"pia_p must be > 0, got {o.pia_p}")
    if o.pia_guidance <= 0:
        problems.append(f"pia_guidance must be > 0, got {o.pia_guidance}")
    return problems


register_signal(
    SignalSpec(
        "pia",
        "diffusion",
        lambda m, b, s, o, c: pia_signals(m, b, s, o.timesteps, o.pia_p, o.pia_guidance, c),
        lambda o: (1 + len(o.timesteps)) * (1 if o.pia_guidance == 1.0 else 2),
        "PIA: noise prediction at t=0 as proximal initialisation (Kong et al. ICLR 2024)",
        score_feature="pia/mean",
        check=_pia_problems,
        score_scale="log",  # a mean p-th power distance: positive, right-skewed
        calibrated_by=("complexity",),
    )
)
