"""Command lines: `python train.py {fit,predict} ...` and `python attack.py --ckpt X`.

    python train.py fit --config configs/diffusion/tiny.yaml                      # target, row 0
    python train.py fit --config configs/diffusion/tiny.yaml --data.model_index 1  # shadow 1
    python train.py fit --config configs/diffusion/tiny.yaml --ckpt_path last     # resume
    python train.py predict --config configs/query/default.yaml \
        --model.ckpt runs/demo/diffusion-target-000/checkpoints/last.ckpt         # query
    python attack.py --ckpt runs/demo/diffusion-target-000/checkpoints/last.ckpt

`MIACLI` runs any `StageModule` (`lightning_mia.stage_module`) in its experiment folder, where
the module says it writes, with what every stage needs: `checkpoints/last.ckpt` (every
`checkpoint_every_n_steps` and at the end of fit, with a DONE marker), a W&B logger (group =
experiment, job type = role; offline without an API key) with the config, the learning rate and
the stage's lineage; quiet unless `--verbose`; `--config configs/...` missing from the working
folder read from the installed package (`paths.find_config`). The stages do the work.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from lightning_mia.callbacks import (
    LoggedConfigCallback,
    check_resume_checkpoint,
    fit_callbacks,
    import_class,
)
from lightning_mia.card import follow_moved_folders
from lightning_mia.data.datamodule import MembershipDataModule
from lightning_mia.paths import ExperimentLayout, with_found_configs
from lightning_mia.stage_module import StageModule
from lightning_mia.terminal import (
    OneLineErrors,
    add_verbose_argument,
    configure_terminal,
    run_cli,
    verbose_requested,
)

CHECKPOINT_EVERY_N_STEPS = 500


class MIAArgumentParser(OneLineErrors, LightningArgumentParser):
    """LightningCLI's parser whose errors are one line."""


class MIACLI(LightningCLI):
    """LightningCLI over any `StageModule` (`model.class_path`) and the splits data."""

    def __init__(self, args: ArgsType = None, run: bool = True) -> None:
        super().__init__(
            model_class=StageModule,
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
        """`fit` (every stage) and `predict` (a query), as Lightning's. No stage has a
        validation or test loop, so `validate` and `test` are not offered: the parser says so
        in one line (and builds two subcommands' arguments instead of four, ~0.2 s a start)."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "predict")}

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

    def _section(self, config: Any) -> Any:
        return config[self.subcommand] if self.subcommand else config

    def parse_arguments(self, parser: Any, args: ArgsType) -> None:
        """Parse, then refuse a `--ckpt_path` of another family before LightningCLI reads the
        checkpoint's hyper-parameters into the config (which would swap the model class)."""
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand") or "") or self.config
        ckpt, model = config.get("ckpt_path"), config.get("model")
        class_path = getattr(model, "class_path", None)
        if ckpt and Path(str(ckpt)).is_file() and class_path:
            model_class = import_class(str(class_path))
            if model_class is not None:
                check_resume_checkpoint(str(ckpt), model_class, config.get("data"))

    def before_instantiate_classes(self) -> None:
        """The terminal as asked; a stage completes its data config before anything is built."""
        config = self._section(self.config)
        configure_terminal(bool(config.get("verbose")))
        follow_moved_folders(config.get("ckpt_path"), config.model.get("init_args"))  # resumed
        model_class = import_class(str(config.model.class_path))
        if isinstance(model_class, type) and issubclass(model_class, StageModule):
            model_class.complete_data_config(config.model.init_args, config.data)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if hasattr(self.datamodule, "train_split"):  # refused before any file is made
            self.model.check_train_split(self.datamodule.train_split)
        layout = ExperimentLayout(self.datamodule.experiment)
        stage = self.model.stage_paths(layout, self.datamodule.model_index)
        config = self._section(self.config)
        trainer_cfg = self._section(self.config_init).get("trainer", {})
        kwargs.setdefault("default_root_dir", str(stage.folder))
        if not config.get("verbose") and trainer_cfg.get("enable_model_summary") is None:
            kwargs["enable_model_summary"] = False
        if trainer_cfg.get("logger") in (None, True):
            from lightning_mia.reporting import make_logger

            kwargs["logger"] = make_logger(
                stage.folder,
                f"{layout.name}/{stage.name}",
                job_type=stage.role,
                group=layout.name,
                project=config.get("wandb_project", "lightning_mia"),
            )
        if self.subcommand == "fit":
            kwargs["callbacks"] = fit_callbacks(
                list(trainer_cfg.get("callbacks") or []),
                stage.folder,
                config.get("checkpoint_every_n_steps"),
                monitor_lr=trainer_cfg.get("logger") is not False,
            )
        if self.subcommand == "predict":
            kwargs["use_distributed_sampler"] = False
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        """The stage's W&B lineage: the splits (and autoencoder) it used, what it made."""
        from lightning_mia.lineage import fit_lineage
        from lightning_mia.reporting import has_wandb_run, log_lineage

        if self.trainer.interrupted or not self.trainer.is_global_zero:
            return
        if not has_wandb_run(self.trainer.logger):
            return
        layout = ExperimentLayout(self.datamodule.experiment)
        stage = self.model.stage_paths(layout, self.datamodule.model_index)
        autoencoder = str(self.model.card_references().get("autoencoder") or "")
        upload = bool(self._section(self.config).get("wandb_upload_checkpoint"))
        log_lineage(self.trainer.logger, *fit_lineage(layout, stage, autoencoder, upload))

    def predict(self, model: StageModule, datamodule: Any = None, **kwargs: Any) -> Any:
        return model.run_predict(self.trainer, datamodule)


def train_main(args: ArgsType = None) -> MIACLI:
    """`python train.py ...`: LightningCLI over lightning_mia's stage modules (quiet unless
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


def attack_main(args: ArgsType = None) -> Any:
    """`python attack.py --ckpt <target checkpoint> [--attack.* ...] [--query.* ...]`."""
    argv = list(sys.argv[1:] if args is None else args)
    configure_terminal(verbose_requested(argv))  # before the model libraries are imported
    from lightning_mia.attack.command import run_attack
    from lightning_mia.attack.options import parse_attack_options
    from lightning_mia.attack.outcome import show_outcome

    outcome = run_cli(lambda: run_attack(parse_attack_options(with_found_configs(argv))))
    if outcome is None:  # not global rank zero
        return None
    show_outcome(outcome)
    return outcome.report


if __name__ == "__main__":  # `python -m lightning_mia.cli fit ...` = `python train.py fit ...`
    train_main()
