"""CLiD (Zhai et al., "Membership Inference on Text-to-image Diffusion Models via Conditional
Likelihood Discrepancy", NeurIPS 2024): how much better the model denoises a query with its
caption than with reduced captions. Gaps and score: higher = member; loss: lower = member.

    feats = compute_signals(model, batch, ["clid"], seed=0)
    # the shadow-calibrated CLiD_th score: lightning_mia.attack.clid.fit_clid_threshold

As the reference code (github zhaisf/CLiD, `mia_CLiD_impt.py`): at each of a few timesteps
around T/2 (440, 450, 460 of 1000) and one fixed noise per sample and timestep, shared by every
condition (the same noise `loss` uses at that t), the noise-space error ℓ(c') = ||eps -
eps_θ(x_t, t, c')||² (mean over the latent, averaged over the timesteps; guidance 1) for the
caption c, the null caption "" and one reduced caption per cut rate r (0.3, 0.5, 0.7): the
caption with its most important words replaced by the tokenizer's end-of-text token (the
reference's `replace_words_topRate`: every word whose importance is at least the
(int(r·n - 0.01)+1)-th largest of the n words'). Features: `clid/loss_cond` = ℓ(c);
`clid/gap_null` = ℓ("") - ℓ(c); `clid/gap_cut{100r}` = ℓ(c_r) - ℓ(c); `clid/score` = the mean of
all the gaps, the reference's CLiD term (`cal_clid_th.py`, `get_l_clidavg_last3`, with the sign
flipped so that higher = member). `clid/score` alone is CLiD_th at α = 1, the one combination
that needs no shadow statistics (a robust scaling of one term keeps its ranking); CLiD_th at
other α robust-scales ℓ(c) and the CLiD term on shadow rows, which the attack stage does
(`lightning_mia.attack.clid`). (2 + len(cut rates)) UNet passes per timestep, every
timestep x condition x sample stacked (`stacked_losses`).

Remaining deviations: the reference reads each word's importance from precomputed metadata
(`tokens_importance`, its computation not released); we take the model's own text encoder:
a word's importance is the mean squared change of the caption's conditioning when that word
alone is masked (text-encoder passes, not counted as queries; made once per batch for every
model that conditions alike, e.g. LoRA fine-tunes of one pipeline: `encodings.CAPTION_MEMO`).
For v-prediction models ℓ is the error of the eps the output implies (the reference's
eps-prediction Stable Diffusion compares its output to the noise directly, which is the same
thing there).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from lightning_mia.graybox.denoiser import (
    noise_seeds,
    per_sample_mean,
    prepared,
    stacked_losses,
    timestep_problems,
)
from lightning_mia.graybox.encodings import CAPTION_MEMO
from lightning_mia.graybox.spec import SignalOptions, SignalSpec, register_signal
from lightning_mia.models.latent import Conditioning

# captions per text-encoder call (word importance, reduced captions): the tiny CLIP encoder at
# 128 tokens costs 0.56 ms a caption at 32 or 64, 0.71 at 128 and 0.87 at 256 (2 threads, AVX2)
ENCODE_CHUNK = 64


def cut_name(rate: float) -> str:
    """Feature name of the gap of the reduced caption at cut `rate`: `clid/gap_cut30`."""
    return f"clid/gap_cut{round(100 * rate)}"


def mask_top_words(caption: str, importance: Sequence[float], rate: float, mask: str) -> str:
    """The caption with its most important words replaced by `mask`: every word whose
    importance is >= the (int(rate·n - 0.01) + 1)-th largest of its n words' (ties masked
    together), as the reference's `replace_words_topRate`. Words are whitespace-separated."""
    words = caption.split()
    if len(importance) != len(words):
        raise ValueError(f"{len(importance)} importances for the {len(words)} words of {caption!r}")
    if not words:
        return caption
    threshold = sorted(importance, reverse=True)[int(rate * len(words) - 0.01)]
    return " ".join(mask if w >= threshold else word for word, w in zip(words, importance))


def _parts(conditioning: Conditioning | torch.Tensor) -> tuple[torch.Tensor, ...]:
    if isinstance(conditioning, Conditioning):
        return conditioning.parts
    return (conditioning,)


def word_importance(
    encode: Callable[[list[str]], Conditioning | torch.Tensor],
    captions: Sequence[str],
    conditioning: Conditioning | torch.Tensor,
    mask: str,
) -> list[list[float]]:
    """Per caption, per word: the mean squared change of the text conditioning (B rows: a
    tensor (B, S, D) or a Conditioning, whose parts' changes are summed) when that word alone
    is replaced by `mask` (`encode` maps captions to their conditioning)."""
    words = [c.split() for c in captions]
    variants = [" ".join([*ws[:j], mask, *ws[j + 1 :]]) for ws in words for j in range(len(ws))]
    owner = [i for i, ws in enumerate(words) for _ in ws]
    scores = []
    for start in range(0, len(variants), ENCODE_CHUNK):
        masked = _parts(encode(variants[start : start + ENCODE_CHUNK]))  # (chunk, ...) each
        rows = owner[start : start + ENCODE_CHUNK]
        change = [
            per_sample_mean((m.float() - f[rows].float()) ** 2)
            for m, f in zip(masked, _parts(conditioning))
        ]
        scores.append(torch.stack(change).sum(0))
    flat = torch.cat(scores).tolist() if scores else []
    ends = torch.tensor([0] + [len(ws) for ws in words]).cumsum(0).tolist()
    return [flat[a:b] for a, b in zip(ends[:-1], ends[1:])]


def mask_word(model: Any) -> str:
    """The word a reduced caption puts in place of a masked one: the tokenizer's end-of-text
    token (CLIP's `<|endoftext|>`, as the reference), or nothing if the tokenizer has none."""
    return getattr(getattr(model, "tokenizer", None), "eos_token", None) or ""


def encode_in_chunks(
    encode: Callable[[list[str]], Conditioning], captions: Sequence[str]
) -> Conditioning:
    """The conditioning of captions, encoded ENCODE_CHUNK at a time."""
    starts = range(0, len(captions), ENCODE_CHUNK)
    return Conditioning.cat([encode(list(captions[i : i + ENCODE_CHUNK])) for i in starts])


def reduced_conditions(
    view: Any, captions: Sequence[str], cond: Conditioning, cut_rates: Sequence[float], mask: str
) -> list[Conditioning]:
    """The conditioning (B rows) of the null caption, then of each cut rate's reduced captions
    (the null caption encoded once, the reduced ones of every rate together)."""
    b = len(captions)
    importance = CAPTION_MEMO.get(  # once for every model that conditions alike
        view.model,
        captions,
        f"clid word importance, mask {mask!r}",
        lambda: tuple(map(tuple, word_importance(view.condition, captions, cond, mask))),
    )
    reduced = [
        mask_top_words(s, w, rate, mask) for rate in cut_rates for s, w in zip(captions, importance)
    ]
    if not reduced:
        return [view.null_condition(b)]
    every = encode_in_chunks(view.condition, reduced)  # (len(cut_rates)·B) rows, rate by rate
    cuts = [every.rows(i * b, (i + 1) * b) for i in range(len(cut_rates))]
    return [view.null_condition(b), *cuts]


def clid_signals(
    model: Any,
    batch: dict[str, Any],
    seed: int,
    timesteps: Sequence[int] = (440, 450, 460),
    cut_rates: Sequence[float] = (0.3, 0.5, 0.7),
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """CLiD's terms of a batch (module docstring): loss, one gap per reduced caption, score."""
    c = prepared(model, batch, cache)
    view, x0, cond = c["view"], c["x0"], c["cond"]
    others = reduced_conditions(view, list(batch["caption"]), cond, cut_rates, mask_word(model))
    seeds = noise_seeds(seed, batch["sample_id"])
    # ℓ (K, B): the noise-space error under each condition, averaged over the timesteps
    loss = stacked_losses(view, x0, [cond, *others], timesteps, seeds, eps_error=True)[1].mean(0)
    gaps = loss[1:] - loss[0]  # (1 + len(cut_rates), B): null, then each cut
    out = {"clid/loss_cond": loss[0], "clid/gap_null": gaps[0]}
    out.update({cut_name(rate): gap for rate, gap in zip(cut_rates, gaps[1:])})
    out["clid/score"] = gaps.mean(0)
    return out


def cut_rate_problems(rates: tuple[float, ...]) -> list[str]:
    """Problems with CLiD's cut rates (any family's CLiD): each in (0, 1), distinct in percent."""
    problems = []
    bad = [r for r in rates if not 0 < r < 1]
    if bad:
        problems.append(f"clid_cut_rates {bad} must each be in (0, 1)")
    names = [cut_name(r) for r in rates]
    if len(set(names)) != len(names):
        problems.append(f"clid_cut_rates {list(rates)} must differ in percent")
    return problems


def _clid_problems(o: SignalOptions, n_train: int) -> list[str]:
    problems = timestep_problems("clid_timesteps", o.clid_timesteps, n_train)
    return problems + cut_rate_problems(o.clid_cut_rates)


register_signal(
    SignalSpec(
        "clid",
        "diffusion",
        lambda m, b, s, o, c: clid_signals(m, b, s, o.clid_timesteps, o.clid_cut_rates, c),
        lambda o: len(o.clid_timesteps) * (2 + len(o.clid_cut_rates)),
        "CLiD: loss with null / reduced captions minus loss with the caption (Zhai et al. 2024)",
        score_feature="clid/score",
        check=_clid_problems,
        score_scale="identity",  # a mean gap of losses, either sign
    )
)
