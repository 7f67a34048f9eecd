"""The gray-box signals by name, their options, and `compute_signals`.

    from lightning_mia.graybox import SignalOptions, compute_signals
    feats = compute_signals(model, batch, ["loss", "pia"], seed=0, timesteps=[100, 200])
    feats["loss/t100"]  # (B,)

A signal is a batched function of (model, batch, seed, options) returning flat features
`"<group>/<name>" -> Tensor (B,)`; the group is the signal's name and the attack that reads it
(`GRAYBOX_ATTACKS`). Signals need the model's weights (gray-box access) and are computed under
`torch.no_grad()` in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lightning_mia.attack import AttackSpec
from lightning_mia.graybox import diffusion as dif
from lightning_mia.graybox import seq2seq as s2s

REQUIRED_KEYS = ("pixel_values", "caption", "sample_id")


class SignalError(ValueError):
    """A gray-box signal that cannot run as asked (unknown name, wrong family, bad option)."""


@dataclass(frozen=True)
class SignalOptions:
    """Settings of the gray-box signals (each one names the signals it affects).

    Attributes:
        timesteps: diffusion timesteps of `loss`, `pia` and `clid` (0 <= t < the scheduler's
            num_train_timesteps).
        secmi_t: SecMI's t_sec, the timestep the query is inverted to (paper: 100 of 1000).
        secmi_steps: DDIM steps of SecMI's inversion (secmi_t must be a multiple of it).
        pia_p: the p of PIA's p-norm (> 0).
        clid_weight: λ in `clid/score` = gap - λ · loss (>= 0).
        clid_keep_fraction: share of the caption's words CLiD's reduced caption keeps, (0, 1).
        low_k_percent: k of the Min-K% NLL statistic of `nll` and `nll_gap`, (0, 100].
    """

    timesteps: tuple[int, ...] = (100, 200, 300)
    secmi_t: int = 100
    secmi_steps: int = 10
    pia_p: float = 1.0
    clid_weight: float = 1.0
    clid_keep_fraction: float = 0.5
    low_k_percent: float = 20.0


SignalFn = Callable[[Any, dict, int, SignalOptions, dict], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class SignalSpec:
    """One signal: its family, feature group, function and cost.

    `queries_per_sample(options)` counts model forward passes (UNet or BART) per sample; the
    frozen encoders (autoencoder, text encoder) are not counted.
    """

    family: str
    group: str
    fn: SignalFn = field(repr=False)
    queries_per_sample: Callable[[SignalOptions], int] = field(repr=False)
    description: str = ""


SIGNALS: dict[str, SignalSpec] = {
    "loss": SignalSpec(
        "diffusion",
        "loss",
        lambda m, b, s, o, c: dif.loss_signals(m, b, s, o.timesteps, c),
        lambda o: len(o.timesteps),
        "per-sample denoising loss at fixed timesteps and noise (Matsumoto et al. 2023)",
    ),
    "secmi": SignalSpec(
        "diffusion",
        "secmi",
        lambda m, b, s, o, c: dif.secmi_signals(m, b, s, o.secmi_t, o.secmi_steps, c),
        lambda o: o.secmi_steps + 2,
        "SecMI t-error after DDIM inversion to t_sec (Duan et al. ICML 2023)",
    ),
    "pia": SignalSpec(
        "diffusion",
        "pia",
        lambda m, b, s, o, c: dif.pia_signals(m, b, s, o.timesteps, o.pia_p, c),
        lambda o: 1 + len(o.timesteps),
        "PIA: noise prediction at t=0 as proximal initialisation (Kong et al. ICLR 2024)",
    ),
    "clid": SignalSpec(
        "diffusion",
        "clid",
        lambda m, b, s, o, c: dif.clid_signals(
            m, b, s, o.timesteps, o.clid_weight, o.clid_keep_fraction, c
        ),
        lambda o: 3 * len(o.timesteps),
        "CLiD: loss with null / reduced caption minus loss with the caption (Zhai et al. 2024)",
    ),
    "nll": SignalSpec(
        "seq2seq",
        "nll",
        lambda m, b, s, o, c: s2s.nll_signals(m, b, s, o.low_k_percent, c),
        lambda o: 1,
        "per-token NLL of the image codes given the caption (mean, Min-K%, max)",
    ),
    "nll_gap": SignalSpec(
        "seq2seq",
        "nll_gap",
        lambda m, b, s, o, c: s2s.nll_gap_signals(m, b, s, o.low_k_percent, c),
        lambda o: 2,
        "NLL of the codes with the null caption minus with the true caption",
    ),
}

_HINT = "compute the gray-box '{0}' features in the query stage (group '{0}')"
# The attack registry entries: name = group = signal; queries read from the `<name>_queries`
# context key that `query_context` gives (it depends on the options).
GRAYBOX_ATTACKS: dict[str, AttackSpec] = {
    name: AttackSpec(name, (spec.group,), "gray-box", f"{name}_queries", _HINT.format(name))
    for name, spec in SIGNALS.items()
}


def signals_for(family: str) -> list[str]:
    """Names of the signals a family supports."""
    return [n for n, s in SIGNALS.items() if s.family == family]


def query_context(names: Sequence[str], options: SignalOptions = SignalOptions()) -> dict:
    """`{"<name>_queries": model passes per sample}` for the report (AttackSpec context)."""
    return {f"{n}_queries": SIGNALS[n].queries_per_sample(options) for n in names}


def check_signals(
    family: str, names: Sequence[str], options: SignalOptions, num_train_timesteps: int = 0
) -> None:
    """Raise one SignalError listing every problem with names and options for `family`."""
    problems = []
    unknown = [n for n in names if n not in SIGNALS]
    if unknown:
        problems.append(f"unknown signals {unknown} (known: {sorted(SIGNALS)})")
    wrong = [n for n in names if n in SIGNALS and SIGNALS[n].family != family]
    if wrong:
        problems.append(
            f"signals {wrong} are not for the {family!r} family (it supports {signals_for(family)})"
        )
    if not names:
        problems.append("no signal asked for")
    if family == "diffusion":
        problems += _diffusion_problems(names, options, num_train_timesteps)
    if any(n in ("nll", "nll_gap") for n in names) and not 0 < options.low_k_percent <= 100:
        problems.append(f"low_k_percent must be in (0, 100], got {options.low_k_percent}")
    if problems:
        raise SignalError("; ".join(problems))


def _diffusion_problems(names: Sequence[str], o: SignalOptions, n_train: int) -> list[str]:
    problems = []
    valid = f"0 <= t < num_train_timesteps = {n_train}"
    if any(n in ("loss", "pia", "clid") for n in names):
        if not o.timesteps:
            problems.append("timesteps is empty")
        bad = [t for t in o.timesteps if not (isinstance(t, int) and 0 <= t < n_train)]
        if bad:
            problems.append(f"timesteps {bad} out of the scheduler's range ({valid})")
    if "secmi" in names:
        if not 0 < o.secmi_t < n_train:
            problems.append(f"secmi_t {o.secmi_t} out of the scheduler's range (0 < t < {n_train})")
        if o.secmi_steps < 1 or o.secmi_t % o.secmi_steps:
            problems.append(
                f"secmi_t {o.secmi_t} must be a positive multiple of secmi_steps {o.secmi_steps}"
            )
    if "pia" in names and not o.pia_p > 0:
        problems.append(f"pia_p must be > 0, got {o.pia_p}")
    if "clid" in names:
        if o.clid_weight < 0:
            problems.append(f"clid_weight must be >= 0, got {o.clid_weight}")
        if not 0 < o.clid_keep_fraction < 1:
            problems.append(f"clid_keep_fraction must be in (0, 1), got {o.clid_keep_fraction}")
    return problems


def _check_batch(batch: dict[str, Any]) -> int:
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise SignalError(f"batch lacks {missing}; gray-box signals need {list(REQUIRED_KEYS)}")
    b = int(batch["sample_id"].numel())
    if batch["pixel_values"].shape[0] != b or len(batch["caption"]) != b:
        raise SignalError(
            f"batch sizes disagree: {b} sample ids, {batch['pixel_values'].shape[0]} images, "
            f"{len(batch['caption'])} captions"
        )
    return b


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """float32 maths inside: autocast off and, on CUDA, no TF32 (restored after).

    SecMI's t-error compares latents that differ by ~1e-3; bf16 or TF32 rounding is as large.
    """
    cuda = torch.device(device).type == "cuda"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(torch.device(device).type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compute_signals(
    model: Any,
    batch: dict[str, Any],
    names: Sequence[str],
    seed: int,
    timesteps: Sequence[int] | None = None,
    options: SignalOptions = SignalOptions(),
) -> dict[str, torch.Tensor]:
    """Features `"<group>/<name>" -> float32 (B,)` of the named signals on one batch.

    `timesteps`, when given, replaces `options.timesteps`. Noise is fixed by (seed, sample_id),
    so the target and every shadow model see the same noise for a sample. The model is put in
    eval mode for the call (and restored after) and the maths runs in float32.
    """
    family = getattr(model, "family", "")
    if timesteps is not None:
        options = replace(options, timesteps=tuple(int(t) for t in timesteps))
    n_train = 0
    if family == "diffusion":
        n_train = int(model.noise_scheduler.config.num_train_timesteps)
    check_signals(family, names, options, n_train)
    _check_batch(batch)
    was_training = model.training
    model.eval()
    cache: dict[str, Any] = {}  # latents, conditioning, codes: shared between signals
    out: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad(), full_precision(model.device):
            for name in dict.fromkeys(names):
                features = SIGNALS[name].fn(model, batch, seed, options, cache)
                out.update({k: v.detach().float() for k, v in features.items()})
    finally:
        model.train(was_training)
    return out
