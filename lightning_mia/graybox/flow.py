"""Gray-box membership signals of the flow-matching family: loss, time sweep, SecMI, PIA.

    from lightning_mia.graybox import SignalOptions, compute_signals
    feats = compute_signals(model, batch, ["flow_loss", "flow_sweep", "flow_secmi", "flow_pia",
                                           "flow_clid"], seed=0)
    feats["flow_sweep/t500"]  # (B,): the flow-matching loss at noise level t = 0.5

A rectified flow trains on the straight path x_t = (1 - t)·x0 + t·eps, t the noise level in
[0, 1], its transformer predicting the velocity v = eps - x0. Each signal queries the model only
through the family interface (`models.latent`, via `graybox.denoiser.LatentView`): latents x0 of
the query image, the caption's conditioning, fixed noise per (seed, sample_id, t) shared by
target and shadows, the model's velocity and the straight-line ends it implies. Features name
a time by the transformer's timestep round(1000·t): `flow_loss/t250` is t = 0.25. Where a
signal asks several times or conditions, their rows go through the transformer stacked
(`graybox.denoiser.stacked_losses`, `stacked_predict`: in chunks of `rows_per_pass` rows), not
one pass per time. The CLiD-style
gap is in `graybox/flow_clid.py`. Which direction means "member" is learned on shadow models;
the expected one is in each docstring.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_mia.graybox.denoiser import (
    guided,
    noise_seeds,
    per_sample_mean,
    prepared,
    stacked_losses,
    stacked_predict,
)
from lightning_mia.graybox.secmi import round_trip, t_error_features
from lightning_mia.graybox.spec import SignalOptions, SignalSpec, register_signal

TIME_SCALE = 1000  # features name a time t by round(TIME_SCALE·t), the transformer's timestep


def time_name(t: float) -> str:
    """`t500` for t = 0.5: the feature suffix of a noise level."""
    return f"t{round(TIME_SCALE * t)}"


# --- loss at fixed times, and the sweep along the path --------------------------------------------
def flow_loss_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    times: Sequence[float],
    group: str = "flow_loss",
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The model's own training loss at fixed times and fixed noise. Lower = member.

    Matsumoto et al. 2023's loss attack adapted to flow matching: `<group>/t{k}` = the
    velocity MSE ||v_θ(x_t, t, c) - (eps - x0)||² at t = k / 1000 (what `per_sample_loss`
    averages in training, here at this t and noise, caption kept), `<group>/mean` over the
    times. One transformer pass per time, all stacked.
    """
    c = prepared(model, batch, cache)
    seeds = noise_seeds(seed, batch["sample_id"])
    losses = stacked_losses(c["view"], c["x0"], [c["cond"]], times, seeds)[:, 0]  # (T, B)
    out = {f"{group}/{time_name(t)}": loss for t, loss in zip(times, losses)}
    out[f"{group}/mean"] = losses.mean(0)
    return out


def flow_sweep_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    times: Sequence[float],
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """The loss along the interpolation path, one feature per time. Lower = member.

    "Where Rectified Flows Leak" (Sesmat, Meseguer-Brocal, Peeters, ICML 2026; arXiv
    2606.07271) finds the member/non-member reconstruction gap bell-shaped over the
    interpolation time, peaking at one time; Rao & Moyer (arXiv 2603.13421) find the attack
    strongest at the integration midpoint under uniform time sampling. Adapted: the
    reconstruction error of x0 from x_t by one step, ||x_t - t·v_θ - x0||², is t² times the
    velocity loss, so at each time both rank samples alike; we give the velocity loss at each
    time (`flow_sweep/t{k}`, the same numbers `flow_loss` gives at those times) and its mean,
    and leave finding the peak to the attack stage's classifier over the curve, trained on
    shadow rows. Neither paper's closed-form peak (Gaussian data) nor Rao & Moyer's image-
    complexity calibration is applied. One pass per time, all stacked.
    """
    return flow_loss_signals(model, batch, seed, times, "flow_sweep", cache)


# --- SecMI: a deterministic Euler round trip ------------------------------------------------------
def flow_secmi_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    t_sec: float = 0.1,
    num_steps: int = 10,
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """SecMI's t-error (Duan et al. ICML 2023) on the probability-flow ODE. Lower = member.

    SecMI inverts x0 deterministically with DDIM to t_sec - Δ, steps up to t_sec and back down,
    and compares at t_sec - Δ (`graybox/secmi.py`, the reference's order). Adapted: the
    deterministic step of a rectified flow is the Euler step x' = x_t + (t' - t)·v_θ(x_t, t)
    (= DDIM with the flow's interpolation), in `num_steps` equal steps from t = 0 to t_sec
    (`secmi_steps`, default 10; t_sec = `flow_secmi_t`, default 0.1: the reference's 100 of
    1000). `flow_secmi/t_error` = mean ||x' - x̃||², `err_max` / `err_p90` summarise the error
    map as `secmi` does. Conditional path, guidance 1; deterministic (`seed` unused);
    num_steps + 1 passes of the batch, sequential by nature.
    """
    c = prepared(model, batch, cache)
    times = [t_sec * i / num_steps for i in range(num_steps + 1)]
    return t_error_features("flow_secmi", *round_trip(c["view"], c["x0"], c["cond"], times))


# --- PIA: the model's own velocity at t = 0 as the noise ------------------------------------------
def flow_pia_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    times: Sequence[float],
    p: float = 4.0,
    guidance: float = 7.5,
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """PIA (Kong et al. ICLR 2024) on a rectified flow. Lower = member.

    PIA queries the model at t = 0 on the clean latents and takes its noise prediction eps0 as
    the noise of a one-step round trip. Adapted: the velocity at t = 0, v0 = v_θ(x0, 0, c),
    implies the noise eps0 = x0 + v0 (the far end of the straight line it predicts, the
    model's own `split_prediction`); x_t = (1 - t)·x0 + t·eps0 = x0 + t·v0, and
    `flow_pia/t{k}` = mean |v_θ(x_t, t, c) - v0|^p, p = `pia_p` (4): a model that memorised x0
    keeps its velocity constant along its own line. In noise space the distance is (1 - t)^p
    times this (same ranking at each t). Both queries classifier-free guided at `pia_guidance`
    as `pia` is (1 = conditional only); `flow_pia/mean` over times. Deterministic; 1 + T passes
    (twice with guidance), the T times stacked in one.
    """
    c = prepared(model, batch, cache)
    view, x0 = c["view"], c["x0"]
    b, n_t = x0.shape[0], len(times)
    conds = view.guidance_condition(c["cond"], guidance)  # kB rows, k = 1 or 2
    k = len(conds) // b
    zero = view.times(0.0, k * b)
    v0 = guided(model.predict(x0.repeat(k, 1, 1, 1), zero, conds), guidance)  # (B, C, h, w)
    eps0 = model.split_prediction(v0, x0, zero[:b])[0]
    t_rows = torch.tensor(list(times), dtype=torch.float32, device=x0.device)
    x_t = model.noised(
        x0.repeat(n_t, 1, 1, 1), eps0.repeat(n_t, 1, 1, 1), t_rows.repeat_interleave(b)
    )
    # rows (t, guidance half, b): each time's k halves side by side for `guided`
    x_rows = x_t.reshape(n_t, 1, b, *x0.shape[1:]).expand(n_t, k, b, *x0.shape[1:]).flatten(0, 2)
    v_t = stacked_predict(view, x_rows, t_rows.repeat_interleave(k * b), conds.repeat(n_t))
    v_t = v_t.reshape(n_t, k * b, *x0.shape[1:])
    out = {
        f"flow_pia/{time_name(t)}": per_sample_mean((guided(v, guidance) - v0).abs() ** p)
        for t, v in zip(times, v_t)
    }
    out["flow_pia/mean"] = torch.stack(list(out.values())).mean(0)
    return out


# --- option checks and registration ---------------------------------------------------------------
def time_problems(name: str, times: Sequence[float]) -> list[str]:
    """Problems with an option of noise levels (each in [0, 1], at least one, distinct names)."""
    if not times:
        return [f"{name} is empty"]
    bad = [t for t in times if not (isinstance(t, (int, float)) and 0.0 <= t <= 1.0)]
    if bad:
        return [f"{name} {bad} out of the flow's time range [0, 1]"]
    names = [time_name(t) for t in times]
    if len(set(names)) != len(names):
        return [f"{name} {list(times)} must differ in thousandths"]
    return []


def _pia_problems(o: SignalOptions, n_train: int) -> list[str]:
    problems = time_problems("flow_times", o.flow_times)
    if o.pia_p <= 0:
        problems.append(f"pia_p must be > 0, got {o.pia_p}")
    if o.pia_guidance <= 0:
        problems.append(f"pia_guidance must be > 0, got {o.pia_guidance}")
    return problems


def _secmi_problems(o: SignalOptions, n_train: int) -> list[str]:
    problems = []
    if not 0.0 < o.flow_secmi_t <= 1.0:
        problems.append(f"flow_secmi_t {o.flow_secmi_t} out of the flow's time range (0, 1]")
    if o.secmi_steps < 1:
        problems.append(f"secmi_steps must be >= 1, got {o.secmi_steps}")
    return problems


register_signal(
    SignalSpec(
        "flow_loss",
        "flow",
        lambda m, b, s, o, c: flow_loss_signals(m, b, s, o.flow_times, "flow_loss", c),
        lambda o: len(o.flow_times),
        "flow-matching loss at fixed times and noise (Matsumoto et al. 2023, for flows)",
        score_feature="flow_loss/mean",
        score_scale="log",  # a mean squared velocity error: positive, right-skewed
        calibrated_by=("complexity",),
        check=lambda o, n: time_problems("flow_times", o.flow_times),
    )
)
register_signal(
    SignalSpec(
        "flow_sweep",
        "flow",
        lambda m, b, s, o, c: flow_sweep_signals(m, b, s, o.flow_sweep_times, c),
        lambda o: len(o.flow_sweep_times),
        "flow-matching loss along the interpolation path (Sesmat et al. ICML 2026)",
        score_feature="flow_sweep/mean",
        score_scale="log",  # a mean of squared velocity errors along the path
        calibrated_by=("complexity",),
        check=lambda o, n: time_problems("flow_sweep_times", o.flow_sweep_times),
    )
)
register_signal(
    SignalSpec(
        "flow_secmi",
        "flow",
        lambda m, b, s, o, c: flow_secmi_signals(m, b, s, o.flow_secmi_t, o.secmi_steps, c),
        lambda o: o.secmi_steps + 1,
        "SecMI t-error of an Euler ODE round trip at flow_secmi_t (Duan et al. 2023, for flows)",
        score_feature="flow_secmi/t_error",
        score_scale="log",  # a squared round-trip error: positive, right-skewed
        calibrated_by=("complexity",),
        check=_secmi_problems,
    )
)
register_signal(
    SignalSpec(
        "flow_pia",
        "flow",
        lambda m, b, s, o, c: flow_pia_signals(m, b, s, o.flow_times, o.pia_p, o.pia_guidance, c),
        lambda o: (1 + len(o.flow_times)) * (1 if o.pia_guidance == 1.0 else 2),
        "PIA: the velocity at t=0 as the noise of a one-step trip (Kong et al. 2024, for flows)",
        score_feature="flow_pia/mean",
        score_scale="log",  # a mean p-th power distance: positive, right-skewed
        calibrated_by=("complexity",),
        check=_pia_problems,
    )
)
