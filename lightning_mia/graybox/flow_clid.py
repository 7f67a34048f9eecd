"""CLiD on a rectified flow (Zhai et al., "Membership Inference on Text-to-image Diffusion Models
via Conditional Likelihood Discrepancy", NeurIPS 2024): how much better the model predicts the
flow of a query with its caption than with the null and reduced captions. Gaps and score:
higher = member; loss: lower = member.

    feats = compute_signals(model, batch, ["flow_clid"], seed=0)

As `clid` (graybox/clid.py, the reference's recipe) with the flow-matching loss in place of the
noise-space error: at each of a few times around the middle of the path (`flow_clid_times`,
0.44, 0.45, 0.46: the reference's 440-460 of 1000) and one fixed noise per sample and time,
shared by every condition (the noise `flow_loss` uses at that t), ℓ(c') = ||v_θ(x_t, t, c') -
(eps - x0)||² (mean over the latent, averaged over the times; guidance 1) for the caption c, the
null caption "" and one reduced caption per cut rate (`clid_cut_rates`): the caption with its
most important words replaced by the first tokenizer's end-of-text token. A word's importance is
the mean squared change of the whole SD3 conditioning (token states and pooled embedding,
summed) when it alone is masked. Features: `flow_clid/loss_cond` = ℓ(c), `flow_clid/gap_null`
= ℓ("") - ℓ(c), `flow_clid/gap_cut{100r}` = ℓ(c_r) - ℓ(c), `flow_clid/score` = the mean of the
gaps (CLiD_th at α = 1; the attack stage calibrates other α on shadow rows). Every time x
condition x sample goes through the transformer in one stacked batch: T·(2 + cut rates) passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_mia.graybox.clid import cut_rate_problems, mask_word, reduced_conditions
from lightning_mia.graybox.denoiser import noise_seeds, prepared, stacked_losses
from lightning_mia.graybox.flow import time_problems
from lightning_mia.graybox.spec import SignalOptions, SignalSpec, register_signal


def cut_name(rate: float) -> str:
    """Feature name of the gap of the reduced caption at cut `rate`: `flow_clid/gap_cut30`."""
    return f"flow_clid/gap_cut{round(100 * rate)}"


def flow_clid_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    times: Sequence[float] = (0.44, 0.45, 0.46),
    cut_rates: Sequence[float] = (0.3, 0.5, 0.7),
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """CLiD's terms of a batch on a flow model (module docstring)."""
    c = prepared(model, batch, cache)
    view, x0, cond = c["view"], c["x0"], c["cond"]
    others = reduced_conditions(view, list(batch["caption"]), cond, cut_rates, mask_word(model))
    seeds = noise_seeds(seed, batch["sample_id"])
    loss = stacked_losses(view, x0, [cond, *others], times, seeds).mean(0)  # (K, B)
    gaps = loss[1:] - loss[0]  # (1 + len(cut_rates), B): null, then each cut
    out = {"flow_clid/loss_cond": loss[0], "flow_clid/gap_null": gaps[0]}
    out.update({cut_name(rate): gap for rate, gap in zip(cut_rates, gaps[1:])})
    out["flow_clid/score"] = gaps.mean(0)
    return out


def _problems(o: SignalOptions, n_train: int) -> list[str]:
    return time_problems("flow_clid_times", o.flow_clid_times) + cut_rate_problems(o.clid_cut_rates)


register_signal(
    SignalSpec(
        "flow_clid",
        "flow",
        lambda m, b, s, o, c: flow_clid_signals(m, b, s, o.flow_clid_times, o.clid_cut_rates, c),
        lambda o: len(o.flow_clid_times) * (2 + len(o.clid_cut_rates)),
        "CLiD on a flow: loss with null / reduced captions minus with the caption (Zhai 2024)",
        score_feature="flow_clid/score",
        check=_problems,
    )
)
