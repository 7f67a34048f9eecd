"""Gray-box membership signals of the seq2seq family: per-token NLL of the image codes.

    from lightning_mia.graybox import compute_signals
    feats = compute_signals(model, batch, ["nll", "nll_gap"], seed=0)

The query image is tokenized by the model's frozen VQ tokenizer; BART scores its codes given the
caption with teacher forcing (`Seq2SeqModule.per_token_nll`). Both signals are deterministic
(no sampling): `seed` is accepted for a uniform signature and unused.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lightning_mia.graybox.encodings import encode_once
from lightning_mia.graybox.spec import SignalOptions, SignalSpec, register_signal


def low_k_mean(nll: torch.Tensor, percent: float) -> torch.Tensor:
    """Min-K% Prob (Shi et al. 2024) in NLL form: the mean NLL (B,) of the ceil(percent% · L)
    tokens of each row of `nll` (B, L) with the LOWEST probability (the highest NLL)."""
    k = max(1, math.ceil(nll.shape[1] * percent / 100.0))
    return nll.topk(k, dim=1).values.mean(dim=1)


def code_nll(
    model: Any, batch: dict[str, Any], cache: dict[str, Any], with_null: bool = False
) -> list[torch.Tensor]:
    """Per-token NLL (B, L) of the batch's image codes given its true captions and, `with_null`,
    given the null caption "" too. The codes (one VQ encoding) and each NLL are cached; the
    passes not yet cached run as one BART call (the captions stacked, padded to the longest)."""
    if "codes" not in cache:
        cache["codes"] = encode_once(model, batch["pixel_values"].to(model.device))  # (B, L)
    codes, b = cache["codes"], len(batch["caption"])
    captions = {"nll": list(batch["caption"]), "null_nll": [""] * b}
    wanted = ["nll", "null_nll"] if with_null else ["nll"]
    missing = [k for k in wanted if k not in cache]
    if missing:
        rows = [caption for k in missing for caption in captions[k]]
        nll = model.per_token_nll(rows, codes.repeat(len(missing), 1)).float()
        cache.update({k: nll[i * b : (i + 1) * b] for i, k in enumerate(missing)})
    return [cache[k] for k in wanted]


def nll_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    percent: float = 20.0,
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """NLL of the image codes given the caption. Lower = member (for all three).

    `nll/mean` over the L codes; `nll/low{k}` the Min-K% mean (the k% least likely codes,
    k = `percent`); `nll/max` the least likely code. One BART pass (with `nll_gap`'s in the
    same call when both are asked).
    """
    cache = {} if cache is None else cache
    nll = code_nll(model, batch, cache, "nll_gap" in cache.get("asked", ()))[0]  # (B, L)
    return {
        "nll/mean": nll.mean(dim=1),
        f"nll/low{percent:g}": low_k_mean(nll, percent),
        "nll/max": nll.max(dim=1).values,
    }


def nll_gap_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    percent: float = 20.0,
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """How much the caption helps: NLL with the null caption "" minus NLL with the true one.

    Direction depends on the regime: higher = member when the model learnt the caption-image
    pairing more than the images themselves (CLiD's intuition); when it memorises the members'
    codes outright, the null caption (trained through caption dropout) recalls them too and the
    gap is LOWER for members (tiny model, 16 members: AUC 0.91-1.0 lower = member). The attack
    stage learns the direction on shadow models. `nll_gap/mean` = the gap
    of the mean NLLs; `nll_gap/low{k}` = the gap of the Min-K% means (each taken over its own
    least likely k% of codes). Two BART passes, stacked in one call (one shared with `nll`
    when both are asked).
    """
    nll, null = code_nll(model, batch, {} if cache is None else cache, with_null=True)
    return {
        "nll_gap/mean": null.mean(dim=1) - nll.mean(dim=1),
        f"nll_gap/low{percent:g}": low_k_mean(null, percent) - low_k_mean(nll, percent),
    }


def _low_k_problems(o: SignalOptions, n_train: int) -> list[str]:
    if 0 < o.low_k_percent <= 100:
        return []
    return [f"low_k_percent must be in (0, 100], got {o.low_k_percent}"]


register_signal(
    SignalSpec(
        "nll",
        "seq2seq",
        lambda m, b, s, o, c: nll_signals(m, b, s, o.low_k_percent, c),
        lambda o: 1,
        "per-token NLL of the image codes given the caption (mean, Min-K%, max)",
        score_feature="nll/mean",
        check=_low_k_problems,
        score_scale="identity",  # already -log p (Carlini's logit is about -NLL when p is small)
        calibrated_by=("complexity",),
    )
)
register_signal(
    SignalSpec(
        "nll_gap",
        "seq2seq",
        lambda m, b, s, o, c: nll_gap_signals(m, b, s, o.low_k_percent, c),
        lambda o: 2,
        "NLL of the codes with the null caption minus with the true caption",
        score_feature="nll_gap/mean",
        check=_low_k_problems,
        score_scale="identity",  # a difference of log-probabilities, either sign
    )
)
