"""The callbacks every `train.py fit` stage gets (`lightning_mia.cli.MIACLI` adds them), and
the check of a checkpoint to resume from.

- `fit_callbacks`: checkpointing, the DONE marker and the learning-rate monitor;
- `FinalCheckpoint`: `checkpoints/last.ckpt` at the end of fit, whatever the step count, and a
  DONE marker, so a re-run of a finished stage skips it;
- `LoggedConfigCallback`: the resolved config in the stage folder (Lightning's config.yaml)
  and in the W&B run, with the experiment's splits settings.
"""

from __future__ import annotations

import importlib
from dataclasses import replace
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import SaveConfigCallback

from lightning_mia.card import CheckpointError, read_card, resumed_card
from lightning_mia.paths import (
    CHECKPOINT_DIR,
    ExperimentLayout,
    atomic_write_json,
    done_marker,
    last_checkpoint,
)


def at_last_step(trainer: Trainer) -> bool:
    """Whether the optimizer step just taken is the run's last (`max_steps`)."""
    return 0 < trainer.max_steps <= trainer.global_step


class FinalCheckpoint(Callback):
    """Write `last.ckpt` when fit ends, whatever the step count (ModelCheckpoint saves by
    interval only), and a DONE marker so a re-run of a finished stage can skip it.

    The checkpoint is written at the end of the last training batch (or of the last epoch),
    where the loops' state is the one Lightning resumes from: `--ckpt_path last` with a larger
    `max_steps` then trains on as one run of that many steps would. Written at the end of fit
    instead, the loops had already closed the epoch, and a continued run ended its next epoch
    after one batch (measured: weights 2.2e-3 from the longer run's after 2 more steps)."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)
        self._saved_at: int | None = None

    def _save(self, trainer: Trainer) -> None:
        # full state (optimizer, loops), so a later `--ckpt_path last` can train on
        trainer.save_checkpoint(last_checkpoint(self.dirpath), weights_only=False)
        self._saved_at = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if at_last_step(trainer):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epochs = trainer.max_epochs  # -1 or None: no epoch limit (max_steps ends the run)
        last_epoch = epochs is not None and 0 < epochs <= trainer.current_epoch + 1
        if last_epoch and self._saved_at != trainer.global_step:
            self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.interrupted:
            return
        if self._saved_at != trainer.global_step:  # stopped otherwise (a callback, a limit)
            self._save(trainer)
        if trainer.is_global_zero:
            atomic_write_json(
                done_marker(self.dirpath),
                {"global_step": trainer.global_step, "max_steps": trainer.max_steps},
            )


class LoggedConfigCallback(SaveConfigCallback):
    """config.yaml in the stage folder (Lightning's) and the same resolved config, with the
    experiment's splits settings, in the W&B run (rank zero)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        import yaml

        from lightning_mia.lineage import splits_summary
        from lightning_mia.reporting import log_config

        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "experiment"):
            config["splits"] = splits_summary(ExperimentLayout(datamodule.experiment))
        log_config(trainer.logger, config)


class IntervalCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` by interval, leaving the last step to `FinalCheckpoint`:
    not at the final batch (where an interval that divides `max_steps` wrote the same file a
    second time) and not when training ends (Lightning 2.6, `save_last`: written there it holds
    the loops' end-of-fit state, over the end-of-batch one)."""

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if not at_last_step(trainer):
            super().on_train_batch_end(trainer, *args)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        return None


def fit_callbacks(
    configured: list[Callback], folder: Path, every_n_steps: int | None, monitor_lr: bool
) -> list[Callback]:
    """The configured callbacks, plus `checkpoints/last.ckpt` every `every_n_steps` steps, the
    final checkpoint with its DONE marker and (with a logger) the learning-rate monitor."""
    callbacks = list(configured)
    if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
        callbacks.append(
            IntervalCheckpoint(
                dirpath=folder / CHECKPOINT_DIR,
                save_last=True,
                save_top_k=0,
                enable_version_counter=False,
                every_n_train_steps=every_n_steps,
            )
        )
    callbacks.append(FinalCheckpoint(folder))
    if monitor_lr and not any(isinstance(c, LearningRateMonitor) for c in callbacks):
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


def import_class(class_path: str) -> Any:
    """The class a config's `class_path` names (None when it does not import)."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def check_resume_checkpoint(ckpt: str, model_class: Any, data: Any = None) -> None:
    """CheckpointError unless `ckpt` is a lightning_mia checkpoint of the configured model's
    family (resuming a diffusion run from an autoencoder checkpoint, say) and, with the data
    config, of its row and splits (a shadow's checkpoint given to the target): refused before
    the run writes anything (its config.yaml)."""
    card, family = read_card(ckpt), getattr(model_class, "family", "")
    if family and card.family != family:
        raise CheckpointError(
            f"--ckpt_path {ckpt} is a {card.family} checkpoint, but the config trains a "
            f"{family} model ({model_class.__name__}): resume a run from its own "
            "checkpoints/last.ckpt"
        )
    if data is None or data.get("experiment") is None or data.get("model_index") is None:
        return
    from lightning_mia.data.splits import load_splits

    splits = ExperimentLayout(data.experiment).splits
    current = replace(card, model_index=int(data.model_index), experiment=str(data.experiment))
    if splits.is_file():
        current.splits_hash = load_splits(splits).hash
    try:
        resumed_card(card, current)
    except CheckpointError as err:
        raise CheckpointError(f"--ckpt_path {ckpt}: {err}") from None
