"""Fit one attack classifier on feature rows, early-stopped on a held-out part of those rows.

    model = fit_on_rows(x, y, names, folder / "pixel", "shadow", seed=0, fit=FitOptions())
    logits = model.score(x_target)  # (S,), higher = member

The held-out part is a seeded, stratified `VAL_FRACTION` of the rows (crossed with `strata`, e.g.
the shadow model each row comes from), so early stopping never looks at the rows scored later.
Shared by the attacks (`attack.runner`) and the blind diagnostic's folds (`attack.blind`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.attack.data import AttackDataModule, stratified_split
from lightning_mia.attack.module import AttackModule, fit_attack

VAL_FRACTION = 0.2  # held-out part of the training rows, for early stopping


@dataclass(frozen=True)
class FitOptions:
    """How every attack classifier of one run is trained."""

    max_epochs: int = 200  # upper bound (early stopping usually ends it)
    patience: int = 10  # early-stopping patience in epochs
    logger: Logger | None = None  # Lightning logger of the training curves
    progress: bool = True  # progress bars


def split_rows(
    y: torch.Tensor, seed: int, strata: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(trained-on, held-out) row indices of `fit_on_rows`: early stopping reads the held-out
    ones, which the classifier never trains on."""
    return stratified_split(y, VAL_FRACTION, seed + 1, strata)


def held_out(y: torch.Tensor, seed: int, strata: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the rows `fit_on_rows` holds out (`split_rows`)."""
    return split_rows(y, seed, strata)[1]


def fit_on_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    names: Sequence[str],
    folder: Path,
    filename: str,
    seed: int,
    fit: FitOptions,
    strata: torch.Tensor | None = None,
    prefix: str = "attack",
    announce: bool = True,
) -> AttackModule:
    """An AttackModule fitted on rows x (S, F) with labels y (S,) in {0, 1}; its checkpoint is
    `<folder>/<filename>.ckpt`, its logged metrics `<prefix>/...`; `announce` says what it is
    fitted on in one line (a caller fitting many, the folds of one diagnostic, says it once)."""
    keep, held = split_rows(y, seed, strata)
    dm = AttackDataModule((x[keep], y[keep]), (x[held], y[held]), seed=seed)
    lightning.seed_everything(seed, verbose=False)  # initial weights: same seed, same attack
    module = AttackModule(len(names), feature_names=list(names), metric_prefix=prefix)
    if announce:
        rank_zero_info(f"{prefix}: {len(names)} features, {len(keep)} training rows")
    return fit_attack(
        module,
        dm,
        folder,
        seed=seed,
        filename=filename,
        max_epochs=fit.max_epochs,
        patience=fit.patience,
        logger=fit.logger,
        progress=fit.progress,
    )
