"""Computing the gray-box signals: names and options checked, then `compute_signals`.

    from lightning_mia.graybox import SignalOptions, compute_signals
    feats = compute_signals(model, batch, ["loss", "pia"], seed=0, timesteps=[100, 200])
    feats["loss/t100"]  # (B,)

The signals are those the family modules imported below register (`graybox.spec.SIGNALS`).
Signals need the model's weights (gray-box access) and are computed under `torch.no_grad()`
in eval mode, in float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from lightning_mia.graybox.spec import SIGNALS, SignalError, SignalOptions

REQUIRED_KEYS = ("pixel_values", "caption", "sample_id")


def signals_for(family: str) -> list[str]:
    """Names of the signals a family supports."""
    return sorted(n for n, s in SIGNALS.items() if s.family == family)


def signal_queries(names: Sequence[str], options: SignalOptions = SignalOptions()) -> dict:
    """`{name: model passes per sample}` of each signal under `options` (for the report)."""
    return {n: SIGNALS[n].queries_per_sample(options) for n in names}


def check_signals(
    family: str, names: Sequence[str], options: SignalOptions, num_train_timesteps: int = 0
) -> None:
    """Raise one SignalError listing every problem with names and options for `family`."""
    problems = []
    unknown = [n for n in names if n not in SIGNALS]
    if unknown:
        problems.append(f"unknown signals {unknown} (known: {SIGNALS.names()})")
    wrong = [n for n in names if n in SIGNALS and SIGNALS[n].family != family]
    if wrong:
        problems.append(
            f"signals {wrong} are not for the {family!r} family (it supports {signals_for(family)})"
        )
    if not names:
        problems.append("no signal asked for")
    for name in names:
        if name in SIGNALS and SIGNALS[name].family == family:
            problems += SIGNALS[name].check(options, num_train_timesteps)
    if problems:
        raise SignalError("; ".join(dict.fromkeys(problems)))


def check_model_signals(model: Any, names: Sequence[str], options: SignalOptions) -> None:
    """`check_signals` for a loaded model: its family and its training time grid
    (`TextToImageModule.num_train_timesteps`, 0 for a family without one)."""
    n_train = int(getattr(model, "num_train_timesteps", 0))
    check_signals(getattr(model, "family", ""), names, options, n_train)


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
    cache: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Features `"<group>/<name>" -> float32 (B,)` of the named signals on one batch.

    `timesteps`, when given, replaces `options.timesteps`. Noise is fixed by (seed, sample_id),
    so the target and every shadow model see the same noise for a sample. The model is put in
    eval mode for the call (and restored after) and the maths runs in float32. What signals
    share (latents or codes, the captions' conditioning) is computed once per call; pass the
    same `cache` dict to several calls on one batch to share it between them too (it is
    emptied when the model, sample ids or captions change).
    """
    if timesteps is not None:
        options = replace(options, timesteps=tuple(int(t) for t in timesteps))
    check_model_signals(model, names, options)
    _check_batch(batch)
    was_training = model.training
    if was_training:  # a mode switch walks every module: only when needed
        model.eval()
    cache = batch_cache({} if cache is None else cache, model, batch)
    cache["asked"] = frozenset(names)  # a signal may compute a later one's pass with its own
    out: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad(), full_precision(model.device):
            for name in dict.fromkeys(names):
                features = SIGNALS[name].fn(model, batch, seed, options, cache)
                out.update({k: v.detach().float() for k, v in features.items()})
    finally:
        if was_training:
            model.train()
    return out


def batch_cache(cache: dict[str, Any], model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """`cache` (latents, conditioning, codes shared between signals), emptied first unless it
    was filled for this model, these sample ids and these captions."""
    key = (id(model), tuple(batch["sample_id"].reshape(-1).tolist()), tuple(batch["caption"]))
    if cache.get("batch") != key:
        cache.clear()
        cache["batch"] = key
    return cache
