"""`StageModule`: what `train.py` needs of the module of any stage it runs.

    class EncoderModule(StageModule):
        family = "encoder"
        def check_train_split(self, train_split): ...   # refuse a model's members

`train.py` (`lightning_mia.cli`) runs any `StageModule` — image autoencoder, attacker's encoder
or captioner, text-to-image target or shadow, query — and asks it, through these methods and
nothing else, where it writes (`stage_paths`), whether its training split is allowed
(`check_train_split`), which folders it depends on (`card_references`, for W&B lineage), how
its data is configured (`complete_data_config`, before anything is built) and how it predicts
(`run_predict`). The defaults suit a stage that trains a model of a row of splits.json.
"""

from __future__ import annotations

from typing import Any, ClassVar

from lightning.pytorch import LightningModule, Trainer

from lightning_mia.paths import ExperimentLayout, StagePaths


class StageModule(LightningModule):
    """A LightningModule that runs as one stage of an experiment."""

    family: ClassVar[str] = ""  # the stage's kind: a text-to-image family, "encoder", ...

    def stage_paths(self, layout: ExperimentLayout, model_index: int) -> StagePaths:
        """Where the stage writes (checkpoints, DONE marker, logs), its run name and role."""
        return layout.stage(self.family, model_index)

    def check_train_split(self, train_split: str) -> None:
        """Refuse, before any file is written, a training split the stage must not see."""

    def card_references(self) -> dict[str, str]:
        """Folders the model depends on: {"autoencoder": ..., "tokenizer": ...}."""
        return {}

    @classmethod
    def complete_data_config(cls, model_args: Any, data: Any) -> None:
        """Fill in the data config (a jsonargparse Namespace) from the model's arguments
        before anything is built; the default leaves it as configured."""

    def run_predict(self, trainer: Trainer, datamodule: Any) -> Any:
        """`train.py predict`: Lightning's predict loop by default."""
        return trainer.predict(self, datamodule=datamodule)
