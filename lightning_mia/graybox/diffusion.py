"""Gray-box membership signals of the latent-diffusion family: loss, SecMI, PIA and CLiD.

    from lightning_mia.graybox import compute_signals
    feats = compute_signals(model, batch, ["loss", "secmi", "pia", "clid"], seed=0)

This module declares `loss`, then imports the modules that declare the others, in this order:
`graybox/secmi.py`, `graybox/pia.py`, `graybox/clid.py`; what they share (fixed noise, the
model's parts, eps/x0 from any prediction type, guidance) is in `graybox/denoiser.py`. Each
signal returns raw per-sample statistics; which direction means "member" is learned by the
attack stage on shadow models (the expected direction is in each docstring), and each docstring
names its reference and what still differs from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_mia.graybox.denoiser import (
    noise_seeds,
    prepared,
    stacked_losses,
    timestep_problems,
)
from lightning_mia.graybox.spec import SignalOptions, SignalSpec, register_signal


# --- loss (Matsumoto et al. 2023; Hu & Pang 2023) -------------------------------------------------
def loss_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    timesteps: Sequence[int],
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample denoising loss at fixed timesteps and fixed noise. Lower = member.

    `loss/t{t}`: the model's own training loss (`model.loss_at(...).loss`, the one
    `per_sample_loss` takes the mean of in training, here with this t and noise: MSE to its
    training target, e.g. v); `loss/eps_t{t}`: the error in noise space, ||eps - eps_θ||² (for
    v-prediction it is ᾱ_t times the v-loss, so only the means differ); `loss/mean` and
    `loss/eps_mean` over timesteps. One UNet pass per timestep, all stacked (`stacked_losses`).
    """
    c = prepared(model, batch, cache)
    seeds = noise_seeds(seed, batch["sample_id"])
    losses, eps_errors = stacked_losses(c["view"], c["x0"], [c["cond"]], timesteps, seeds, True)
    out: dict[str, torch.Tensor] = {}
    for t, loss, eps_error in zip(timesteps, losses[:, 0], eps_errors[:, 0]):
        out[f"loss/t{t}"] = loss
        out[f"loss/eps_t{t}"] = eps_error
    out["loss/mean"] = torch.stack([out[f"loss/t{t}"] for t in timesteps]).mean(0)
    out["loss/eps_mean"] = torch.stack([out[f"loss/eps_t{t}"] for t in timesteps]).mean(0)
    return out


def _loss_problems(o: SignalOptions, n_train: int) -> list[str]:
    return timestep_problems("timesteps", o.timesteps, n_train)


register_signal(
    SignalSpec(
        "loss",
        "diffusion",
        lambda m, b, s, o, c: loss_signals(m, b, s, o.timesteps, c),
        lambda o: len(o.timesteps),
        "per-sample denoising loss at fixed timesteps and noise (Matsumoto et al. 2023)",
        score_feature="loss/mean",
        check=_loss_problems,
        score_scale="log",  # a mean squared error: positive, right-skewed
        calibrated_by=("complexity",),
    )
)
