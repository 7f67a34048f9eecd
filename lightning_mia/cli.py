"""Command lines: `python train.py {fit,validate,predict} ...` and `python attack.py --ckpt X`.

    python train.py fit --config configs/diffusion/tiny.yaml                      # target, row 0
    python train.py fit --config configs/diffusion/tiny.yaml --data.model_index 1  # shadow 1
    python train.py fit --config configs/diffusion/tiny.yaml --ckpt_path last     # resume
    python train.py predict --config configs/query/default.yaml \
        --model.ckpt runs/demo/diffusion-target-000/checkpoints/last.ckpt         # query

`MIACLI` places every run in its experiment folder (`<experiment>/<family>-<role>-<index>/`,
`autoencoder/`, `encoder/` or `queries/<run>/`), adds the checkpointing every stage needs
(`checkpoints/last.ckpt`, written at the end of fit and every `checkpoint_every_n_steps`) and a
W&B logger (group = experiment, job_type = role; offline without an API key).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_mia.data.datamodule import MembershipDataModule
from lightning_mia.errors import UserError
from lightning_mia.paths import (
    CHECKPOINT_DIR,
    ExperimentLayout,
    StagePaths,
    atomic_write_json,
    done_marker,
    last_checkpoint,
)

CHECKPOINT_EVERY_N_STEPS = 500


class FinalCheckpoint(Callback):
    """Write `last.ckpt` when fit ends, whatever the step count (ModelCheckpoint saves by
    interval only), and a DONE marker so a re-run of a finished stage can skip it."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.interrupted:
            return
        # full state (optimizer, loops), so a later `--ckpt_path last` can train on
        trainer.save_checkpoint(last_checkpoint(self.dirpath), weights_only=False)
        if trainer.is_global_zero:
            atomic_write_json(
                done_marker(self.dirpath),
                {"global_step": trainer.global_step, "max_steps": trainer.max_steps},
            )


def stage_of(model: LightningModule, datamodule: Any) -> StagePaths:
    """Where the stage that `model` runs in its experiment writes, its run name and role."""
    from lightning_mia.query.module import QueryModule

    layout = ExperimentLayout(datamodule.experiment)
    if isinstance(model, QueryModule):
        return layout.query_stage(model.run_name)
    return layout.stage(getattr(model, "family", ""), datamodule.model_index)


def query_data_config(data: Any, ckpt: str) -> None:
    """A query reads its data from the checkpoint's experiment: the row from the run card, the
    source and the split settings from splits.json (so no data config is needed)."""
    from jsonargparse import Namespace

    from lightning_mia.card import read_card
    from lightning_mia.data import SOURCES
    from lightning_mia.data.splits import load_splits

    card = read_card(ckpt)
    data.experiment, data.model_index = card.experiment, card.model_index
    splits = load_splits(ExperimentLayout(card.experiment).splits)
    for key, value in splits.config.items():
        data[key] = value
    source = splits.dataset["source"]
    cls = SOURCES[source["name"]]
    class_path = f"{cls.__module__}.{cls.__qualname__}"
    data.source = Namespace(class_path=class_path, init_args=Namespace(**source["init_args"]))


class MIACLI(LightningCLI):
    """LightningCLI over any lightning_mia module (`model.class_path`) and the splits data."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            subclass_mode_model=True,
            datamodule_class=MembershipDataModule,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=CHECKPOINT_EVERY_N_STEPS,
            help="save checkpoints/last.ckpt every this many optimizer steps (and at the end)",
        )
        parser.add_argument(
            "--wandb_project", type=str, default="lightning_mia", help="W&B project name"
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        model_cfg = config.get("model")
        ckpt = getattr(getattr(model_cfg, "init_args", None), "ckpt", None)
        if ckpt and str(model_cfg.class_path).endswith("QueryModule"):
            query_data_config(config.data, ckpt)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        stage = stage_of(self.model, self.datamodule)
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("default_root_dir", str(stage.folder))
        if trainer_cfg.get("logger") in (None, True):
            from lightning_mia.reporting import make_logger

            group = ExperimentLayout(self.datamodule.experiment).name
            kwargs["logger"] = make_logger(
                stage.folder, f"{group}/{stage.name}", job_type=stage.role, group=group,
                project=config.get("wandb_project", "lightning_mia"),
            )  # fmt: skip
        if self.subcommand == "fit":
            callbacks = list(trainer_cfg.get("callbacks") or [])
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                callbacks.append(
                    ModelCheckpoint(
                        dirpath=stage.folder / CHECKPOINT_DIR,
                        save_last=True,
                        save_top_k=0,
                        enable_version_counter=False,
                        every_n_train_steps=config.get("checkpoint_every_n_steps"),
                    )
                )
            callbacks.append(FinalCheckpoint(stage.folder))
            kwargs["callbacks"] = callbacks
        if self.subcommand == "predict":
            kwargs["use_distributed_sampler"] = False
        return super().instantiate_trainer(**kwargs)

    def predict(self, model: LightningModule, datamodule: Any = None, **kwargs: Any) -> Any:
        from lightning_mia.query.module import QueryModule
        from lightning_mia.query.run import execute_query

        if isinstance(model, QueryModule):
            return execute_query(model, datamodule, self.trainer)
        return self.trainer.predict(model, datamodule=datamodule, **kwargs)


def run_cli(main: Callable[[], Any]) -> Any:
    """Run `main`; a user error becomes one line on stderr and exit status 1."""
    try:
        return main()
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def train_main(args: ArgsType = None) -> MIACLI:
    """`python train.py ...`: LightningCLI over lightning_mia's modules."""
    return run_cli(lambda: MIACLI(args=args))


def say(text: str) -> None:
    """A command's own output (tables, paths, hints) on stdout, from global rank zero only."""
    from lightning.pytorch.utilities import rank_zero_only

    rank_zero_only(print)(text)


def attack_main(args: ArgsType = None) -> Any:
    """`python attack.py --ckpt <target checkpoint> [--attacks ...] [--setting partial]`."""
    from lightning_mia.attack.command import attack_parser, options_from, run_attack

    parser = attack_parser()
    outcome = run_cli(lambda: run_attack(options_from(parser.parse_args(args))))
    if outcome is None:  # not global rank zero
        return None
    show_outcome(outcome)
    return outcome.report


def show_outcome(outcome: Any) -> None:
    """The result table, where the report files are, and the `wandb sync` hint if offline."""
    from lightning_mia.attack.render import format_table
    from lightning_mia.attack.report import REPORT_JSON, REPORT_MD, ROC_PNG
    from lightning_mia.reporting import wandb_mode_note

    folder, root = outcome.folder, outcome.layout.root
    say(format_table(outcome.report))
    say(f"report: {folder / REPORT_JSON}, {folder / REPORT_MD}, {folder / ROC_PNG}")
    if wandb_mode_note(root):  # offline: every stage of the experiment wrote a run
        say(f"W&B ran offline; upload every run of the experiment with: wandb sync "
            f"{root}/wandb/offline-run-* {root}/*/wandb/offline-run-*")  # fmt: skip


if __name__ == "__main__":  # `python -m lightning_mia.cli fit ...` = `python train.py fit ...`
    train_main()
