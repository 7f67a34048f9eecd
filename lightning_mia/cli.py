"""Command lines: `python train.py {fit,validate,predict} ...` and `python attack.py --ckpt X`.

    python train.py fit --config configs/diffusion/tiny.yaml                      # target, row 0
    python train.py fit --config configs/diffusion/tiny.yaml --data.model_index 1  # shadow 1
    python train.py fit --config configs/diffusion/tiny.yaml --ckpt_path last     # resume
    python train.py predict --config configs/query/default.yaml \
        --model.ckpt runs/demo/diffusion-target-000/checkpoints/last.ckpt         # query

`MIACLI` places every run in its experiment folder (`<experiment>/<family>-<role>-<index>/`,
`autoencoder/`, `encoder/` or `queries/<run>/`), adds the checkpointing every stage needs
(`checkpoints/last.ckpt`, written at the end of fit and every `checkpoint_every_n_steps`), a
W&B logger (group = experiment, job_type = role; offline without an API key) with the resolved
config and the splits settings, the learning rate (`LearningRateMonitor`), and the stage's W&B
lineage at the end of fit (`lightning_mia.lineage`). The terminal is quiet unless `--verbose`
(`lightning_mia.terminal`). `--config configs/...` paths missing from the working folder are
read from the installed package (`find_config`), so the commands work from any folder.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
)
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

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
from lightning_mia.terminal import (
    OneLineErrors,
    add_verbose_argument,
    configure_terminal,
    is_verbose,
    verbose_requested,
)

CHECKPOINT_EVERY_N_STEPS = 500
PACKAGE_DIR = Path(__file__).resolve().parent


def find_config(path: str | os.PathLike) -> str:
    """`path` as given if it exists; else a relative `configs/...` path (file or folder) found
    in the installed package (`lightning_mia/configs/`, or a checkout's `configs/`)."""
    given = Path(path)
    if given.exists() or given.is_absolute() or given.parts[:1] != ("configs",):
        return str(path)
    for root in (PACKAGE_DIR, PACKAGE_DIR.parent):
        if (root / given).exists():
            return str(root / given)
    return str(path)


def with_found_configs(argv: list[str]) -> list[str]:
    """`argv` with every `--config X` / `--config=X` resolved by `find_config`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = find_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + find_config(arg.split("=", 1)[1])
    return out


class StepBudgetProgressBar(RichProgressBar):
    """Lightning's rich bar; a run budgeted in steps (`max_epochs` -1) shows "Epoch 12", not
    "Epoch 12/-2"."""

    def _get_train_description(self, current_epoch: int) -> str:
        if (self.trainer.max_epochs or -1) >= 0:
            return super()._get_train_description(current_epoch)
        return f"{f'Epoch {current_epoch}':{len(self.validation_description)}}"


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
        return layout.query_stage(model.run_name, model.hparams.captioner)
    own = getattr(model, "stage_paths", None)  # a stage that writes where it is told
    if callable(own):
        return own(layout)
    return layout.stage(getattr(model, "family", ""), datamodule.model_index)


def query_data_config(data: Any, ckpt: str) -> None:
    """A query reads its data from the checkpoint's experiment: the row from the run card, the
    source and the split settings from splits.json (so no data config is needed)."""
    from jsonargparse import Namespace

    from lightning_mia.card import read_card
    from lightning_mia.data.sources import SOURCES
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


def check_resume_checkpoint(ckpt: str, class_path: str) -> None:
    """CheckpointError unless `ckpt` is a lightning_mia checkpoint of the configured model's
    family (resuming a diffusion run from an autoencoder checkpoint, say)."""
    import importlib

    from lightning_mia.card import CheckpointError, read_card

    card = read_card(ckpt)
    module, _, name = class_path.rpartition(".")
    family = getattr(getattr(importlib.import_module(module), name, None), "family", "")
    if family and card.family != family:
        raise CheckpointError(
            f"--ckpt_path {ckpt} is a {card.family} checkpoint, but the config trains a "
            f"{family} model ({name}): resume a run from its own checkpoints/last.ckpt"
        )


class MIAArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser whose errors are one line."""


class MIACLI(LightningCLI):
    """LightningCLI over any lightning_mia module (`model.class_path`) and the splits data."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        super().__init__(
            model_class=LightningModule,
            parser_class=MIAArgumentParser,
            subclass_mode_model=True,
            datamodule_class=MembershipDataModule,
            save_config_callback=LoggedConfigCallback,
            save_config_kwargs={"overwrite": True},
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """Lightning's, with `Trainer.validate/test(verbose=...)` left to our `--verbose`."""
        return {name: {*skip, "verbose"} for name, skip in LightningCLI.subcommands().items()}

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
        parser.add_argument(
            "--wandb_upload_checkpoint",
            type=bool,
            default=False,
            help="upload last.ckpt into the model's W&B artifact (default: a checksummed "
            "file:// reference)",
        )
        add_verbose_argument(parser)

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        """Parse, then refuse a `--ckpt_path` of another family before LightningCLI reads the
        checkpoint's hyper-parameters into the config (which would swap the model class)."""
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        config = self.config[sub] if sub else self.config
        ckpt, model = config.get("ckpt_path"), config.get("model")
        if ckpt and Path(str(ckpt)).is_file() and getattr(model, "class_path", None):
            check_resume_checkpoint(str(ckpt), str(model.class_path))

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        configure_terminal(bool(config.get("verbose")))
        model_cfg = config.get("model")
        ckpt = getattr(getattr(model_cfg, "init_args", None), "ckpt", None)
        if ckpt and str(model_cfg.class_path).endswith("QueryModule"):
            query_data_config(config.data, ckpt)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        check = getattr(self.model, "check_train_split", None)  # an attacker's own component
        if callable(check) and hasattr(self.datamodule, "train_split"):
            check(self.datamodule.train_split)  # refused before any file (splits, stage) is made
        stage = stage_of(self.model, self.datamodule)
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("default_root_dir", str(stage.folder))
        if not is_verbose() and trainer_cfg.get("enable_model_summary") is None:
            kwargs["enable_model_summary"] = False
        if trainer_cfg.get("logger") in (None, True):
            from lightning_mia.reporting import make_logger

            group = ExperimentLayout(self.datamodule.experiment).name
            kwargs["logger"] = make_logger(
                stage.folder,
                f"{group}/{stage.name}",
                job_type=stage.role,
                group=group,
                project=config.get("wandb_project", "lightning_mia"),
            )
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
            bar = trainer_cfg.get("enable_progress_bar") is not False and _RICH_AVAILABLE
            if bar and not any(isinstance(c, ProgressBar) for c in callbacks):
                callbacks.append(StepBudgetProgressBar())
            if trainer_cfg.get("logger") is not False and not any(
                isinstance(c, LearningRateMonitor) for c in callbacks
            ):
                callbacks.append(LearningRateMonitor(logging_interval="step"))
            kwargs["callbacks"] = callbacks
        if self.subcommand == "predict":
            kwargs["use_distributed_sampler"] = False
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """The stage's W&B lineage: the splits (and autoencoder) it used, what it made."""
        if self.trainer.interrupted or not self.trainer.is_global_zero:
            return
        from lightning_mia.lineage import fit_lineage
        from lightning_mia.reporting import has_wandb_run, log_lineage

        if not has_wandb_run(self.trainer.logger):
            return
        config = self.config[self.subcommand] if self.subcommand else self.config
        stage = stage_of(self.model, self.datamodule)
        layout = ExperimentLayout(self.datamodule.experiment)
        references = getattr(self.model, "card_references", dict)()  # a text-to-image model's
        autoencoder = str(references.get("autoencoder") or "")
        upload = bool(config.get("wandb_upload_checkpoint"))
        log_lineage(self.trainer.logger, *fit_lineage(layout, stage, autoencoder, upload))

    def predict(self, model: LightningModule, datamodule: Any = None, **kwargs: Any) -> Any:
        from lightning_mia.query.module import QueryModule
        from lightning_mia.query.run import execute_query

        if isinstance(model, QueryModule):
            return execute_query(model, datamodule, self.trainer)
        return self.trainer.predict(model, datamodule=datamodule, **kwargs)


def user_error_in(err: BaseException) -> BaseException | None:
    """The user error behind `err`: itself, or one jsonargparse wrapped while instantiating
    a class from a config (it re-raises a ValueError whose cause or context is the error)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, (UserError, FileNotFoundError)):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def one_line(err: BaseException) -> str:
    """An error's message on one line (a list of problems joined with '; ')."""
    lines = [ln.strip() for ln in str(err).splitlines()]
    lines = [ln[2:] if ln.startswith("- ") else ln for ln in lines]  # a list's bullets
    return "; ".join(ln for ln in lines if ln).replace(":; ", ": ")


def run_cli(main: Callable[[], Any]) -> Any:
    """Run `main`; a user error becomes one line on stderr and exit status 1. Lightning ends a
    run sent SIGTERM with a SystemExit of status 0; here it is 143 (128 + SIGTERM), so a shell,
    a scheduler or the experiment runner never takes a stopped stage for a finished one."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        return main()
    except SIGTERMException:
        print("error: stopped by SIGTERM; run the same command again to resume", file=sys.stderr)
        raise SystemExit(143) from None
    except Exception as err:  # noqa: BLE001 - only user errors are caught, the rest re-raised
        user = user_error_in(err)
        if user is None:
            raise
        print(f"error: {one_line(user)}", file=sys.stderr)
        raise SystemExit(1) from None


def train_main(args: ArgsType = None) -> MIACLI:
    """`python train.py ...`: LightningCLI over lightning_mia's modules (quiet unless
    `--verbose`; `--config configs/...` also found in the installed package)."""
    argv = list(sys.argv[1:]) if args is None else args
    configure_terminal(verbose_requested(argv) if isinstance(argv, list) else False)
    if isinstance(argv, list) and with_found_configs(argv) != argv:
        args = with_found_configs(argv)

    def main() -> MIACLI:
        with warnings.catch_warnings():  # args= given for a package config on the command line
            warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
            return MIACLI(args=args)

    return run_cli(main)


def say(text: str) -> None:
    """A command's own output (tables, paths, hints) on stdout, from global rank zero only."""
    from lightning.pytorch.utilities import rank_zero_only

    rank_zero_only(print)(text)


def attack_main(args: ArgsType = None) -> Any:
    """`python attack.py --ckpt <target checkpoint> [--attacks ...] [--setting partial]`."""
    argv = list(sys.argv[1:] if args is None else args)
    configure_terminal(verbose_requested(argv))  # before the model libraries are imported
    from lightning_mia.attack.command import attack_parser, options_from, run_attack

    parser = attack_parser()
    outcome = run_cli(lambda: run_attack(options_from(parser.parse_args(with_found_configs(argv)))))
    if outcome is None:  # not global rank zero
        return None
    show_outcome(outcome)
    return outcome.report


def show_outcome(outcome: Any) -> None:
    """The result table, where the report files are, and the `wandb sync` hint if offline."""
    from lightning_mia.attack.render import format_table
    from lightning_mia.attack.report import REPORT_JSON, REPORT_MD, ROC_PNG
    from lightning_mia.reporting import offline_run_folders, wandb_mode_note

    folder, root = outcome.folder, outcome.layout.root
    say(format_table(outcome.report))
    say(f"report: {folder / REPORT_JSON}, {folder / REPORT_MD}, {folder / ROC_PNG}")
    runs = offline_run_folders(root)
    if wandb_mode_note(root) and runs:  # offline: every stage of the experiment wrote a run
        # one at a time, oldest first: each artifact reaches W&B from the run that made it
        say(
            f"W&B ran offline; upload the experiment's runs with: wandb sync -n 1 "
            f"{' '.join(str(r) for r in runs)}"
        )


if __name__ == "__main__":  # `python -m lightning_mia.cli fit ...` = `python train.py fit ...`
    train_main()
