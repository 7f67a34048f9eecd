"""`StageData`: what a stage's data hands the module it trains or queries — the one seam.

    data = stage_data(self.trainer)       # inside a LightningModule hook, or None without one
    data.layout.autoencoder, data.model_index, data.splits_hash, data.resolution
    data.training_captions()              # e.g. for a caption tokenizer trained at fit start

`MembershipDataModule.stage_data()` builds it after `setup`; every module kind (text-to-image
families, autoencoder, attacker's encoder, captioner) reads its experiment folder, row, run-card
inputs and captions from it, and nothing else of the datamodule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_mia.paths import ExperimentLayout


@dataclass(frozen=True)
class StageData:
    """The experiment, the row and the data facts a module needs (built after splits exist)."""

    layout: ExperimentLayout  # the experiment folder: every stage path
    model_index: int  # row of splits.json: 0 = target, 1..K = shadows
    splits_hash: str  # recorded in the run card, checked against checkpoints
    train_split: str  # which ids train: "members" (a model's row) or an attacker pool
    resolution: int  # image side the data serves
    num_train_samples: int  # size of the training set (for training steps per image)
    preview_captions: tuple[str, ...] = ()  # fixed captions for sample grids
    training_captions: Callable[[], list[str]] = field(default=list, repr=False, compare=False)


def stage_data(trainer: Any) -> StageData | None:
    """The `StageData` of the trainer's datamodule, or None (no trainer, or other data)."""
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    build = getattr(dm, "stage_data", None)
    return build() if callable(build) else None
