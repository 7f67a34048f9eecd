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
from lightning_mia.paths import ExperimentLayout, atomic_write_json, role_of, run_name

CHECKPOINT_EVERY_N_STEPS = 500
DONE_MARKER = "DONE.json"


class FinalCheckpoint(Callback):
    """Write `last.ckpt` when fit ends, whatever the step count (ModelCheckpoint saves by
    interval only), and a DONE marker so a re-run of a finished stage can skip it."""

    def __init__(self, dirpath: Path) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.interrupted:
            return
        # full state (optimizer, loops), so a later `--ckpt_path last` can train on
        trainer.save_checkpoint(self.dirpath / "checkpoints" / "last.ckpt", weights_only=False)
        if trainer.is_global_zero:
            atomic_write_json(
                self.dirpath / DONE_MARKER,
                {"global_step": trainer.global_step, "max_steps": trainer.max_steps},
            )


def stage_folder(model: LightningModule, datamodule: Any) -> tuple[Path, str, str]:
    """(folder, run name, role) of the stage that `model` runs in its experiment."""
    layout = ExperimentLayout(datamodule.experiment)
    family = getattr(model, "family", "")
    if family == "autoencoder":
        return layout.autoencoder, "autoencoder", "autoencoder"
    if family == "encoder":
        return layout.encoder, "encoder", "attacker"
    if hasattr(model, "card") and getattr(model, "run_name", None):  # QueryModule
        return layout.queries(model.run_name), f"query-{model.run_name}", "query"
    index = datamodule.model_index
    return layout.run_dir(family, index), run_name(family, index), role_of(index)


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
        folder, name, role = stage_folder(self.model, self.datamodule)
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer_cfg = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault("default_root_dir", str(folder))
        if trainer_cfg.get("logger") in (None, True):
            from lightning_mia.reporting import make_logger

            group = ExperimentLayout(self.datamodule.experiment).name
            kwargs["logger"] = make_logger(
                folder, f"{group}/{name}", job_type=role, group=group,
                project=config.get("wandb_project", "lightning_mia"),
            )  # fmt: skip
        if self.subcommand == "fit":
            callbacks = list(trainer_cfg.get("callbacks") or [])
            if not any(isinstance(c, ModelCheckpoint) for c in callbacks):
                callbacks.append(
                    ModelCheckpoint(
                        dirpath=folder / "checkpoints",
                        save_last=True,
                        save_top_k=0,
                        enable_version_counter=False,
                        every_n_train_steps=config.get("checkpoint_every_n_steps"),
                    )
                )
            callbacks.append(FinalCheckpoint(folder))
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


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, shown as one line without a traceback."""
    from lightning_mia.card import CheckpointError
    from lightning_mia.data.sources import DataError
    from lightning_mia.query.module import QueryError
    from lightning_mia.query.shards import ShardError

    errors: list[type[BaseException]] = [
        CheckpointError,
        DataError,
        QueryError,
        ShardError,
        FileNotFoundError,
    ]
    for module, name in (
        ("lightning_mia.attack.runner", "AttackError"),
        ("lightning_mia.models.encoder", "EncoderError"),
        ("lightning_mia.models.autoencoder", "AutoencoderError"),
        ("lightning_mia.models.seq2seq", "Seq2SeqError"),
        ("lightning_mia.models.taming", "TamingImportError"),
        ("lightning_mia.graybox.registry", "SignalError"),
    ):
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def run_cli(main: Callable[[], Any]) -> Any:
    """Run `main`; a user error becomes one line on stderr and exit status 1."""
    try:
        return main()
    except user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


def train_main(args: ArgsType = None) -> MIACLI:
    """`python train.py ...`: LightningCLI over lightning_mia's modules."""
    return run_cli(lambda: MIACLI(args=args))


def find_shadow_checkpoints(layout: ExperimentLayout, family: str) -> list[Path]:
    """`last.ckpt` of every trained shadow run of `family` in the experiment."""
    runs = sorted(layout.root.glob(f"{family}-shadow-[0-9][0-9][0-9]"))
    return [r / "checkpoints" / "last.ckpt" for r in runs if (r / DONE_MARKER).is_file()]


def attack_parser() -> Any:
    """Arguments of `python attack.py` (also readable from a YAML with --config)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(prog="attack.py", description="Membership inference against a target.")
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("--ckpt", type=str, required=True, help="target model checkpoint")
    p.add_argument("--experiment", type=str, default="", help="experiment folder (default: card)")
    p.add_argument(
        "--attacks",
        type=list[str],
        default=["pixel", "semantic", "text", "combined"],
        help="attacks to run (pixel, semantic, text, combined, gray-box ones, or all)",
    )
    p.add_argument("--setting", type=str, default="shadow", help="shadow | partial")
    p.add_argument("--known_fraction", "--known-fraction", type=float, default=0.5)
    p.add_argument("--num_images", "--num-images", type=int, default=4, help="N per query")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_epochs", "--max-epochs", type=int, default=200)
    p.add_argument("--encoder", type=str, default="", help="CLIP folder (default: experiment's)")
    p.add_argument(
        "--signals",
        type=list[str],
        default=["auto"],
        help="gray-box signals computed while querying: all = every one of the family; "
        "auto = those of an existing complete target query, else all; [] = none",
    )
    p.add_argument("--signal_timesteps", "--signal-timesteps", type=list[int] | None, default=None)
    p.add_argument("--accelerator", type=str, default="auto")
    p.add_argument("--devices", type=int | str, default="auto")
    p.add_argument("--progress", type=bool, default=True)
    return p


def cost_context(target: Any, folder: Path) -> dict[str, Any]:
    """Queries and measured seconds per sample of each attack, from the target's query."""
    import json

    from lightning_mia.attack import ATTACKS
    from lightning_mia.query.writer import seconds_per_sample

    context = json.loads(target.metadata.get("signal_queries") or "{}")  # {"<signal>_queries"}
    measured = seconds_per_sample(folder)
    black_box = measured.get("generate", 0.0) + measured.get("features", 0.0)
    seconds = {}
    for name, spec in ATTACKS.items():
        if spec.access == "black-box" and black_box:
            seconds[name] = black_box
        elif name in measured:
            seconds[name] = measured[name]
    if "features" in measured:
        seconds["blind"] = measured["features"]  # upper bound: blind reads a subset of them
    context["seconds_per_sample"] = seconds
    return context


def resolve_signals(asked: list[str], card: Any, layout: ExperimentLayout) -> list[str]:
    """The gray-box signals to compute: `all`, `auto` (reuse a finished query's) or names."""
    from lightning_mia.graybox import signals_for
    from lightning_mia.query.shards import read_complete

    if "auto" in asked:
        done = read_complete(layout.queries(card.run_name))
        if done is None:
            return signals_for(card.family)
        return [s for s in done.get("signals", "").split(",") if s]
    if "all" in asked:
        return signals_for(card.family)
    return list(asked)


def report_folder(layout: ExperimentLayout, setting: str) -> Path:
    """`attack/` for the default shadow setting, `attack/<setting>/` for the others."""
    return layout.attack if setting == "shadow" else layout.attack / setting


def run_attack_command(args: Any) -> Any:
    """Query the target and shadows where needed, train and evaluate the attacks, report."""
    from lightning_mia.attack import ATTACKS
    from lightning_mia.attack.runner import AttackError, run_attacks
    from lightning_mia.card import CheckpointError, read_card
    from lightning_mia.query.run import run_query
    from lightning_mia.reporting import (
        format_table,
        log_report,
        make_logger,
        wandb_mode_note,
        write_report,
    )

    card = read_card(args.ckpt)
    if card.family not in ("diffusion", "seq2seq"):
        raise CheckpointError(f"{args.ckpt} is a {card.family} checkpoint, not a target model")
    layout = ExperimentLayout(args.experiment or card.experiment)
    if args.experiment and Path(args.experiment).resolve() != Path(card.experiment).resolve():
        raise CheckpointError(
            f"{args.ckpt} belongs to experiment {card.experiment}, not {args.experiment}"
        )
    shadows = find_shadow_checkpoints(layout, card.family)
    if not shadows and args.setting == "shadow":
        others = sorted(p.name for p in layout.root.glob("*-shadow-[0-9][0-9][0-9]"))
        hint = f" (found shadows of other families: {others})" if others else ""
        raise AttackError(
            f"no trained {card.family} shadow models in {layout.root}{hint}: train them with "
            f"`python train.py fit --config <config> --data.model_index K` for K = 1, 2, ..."
        )
    known = sorted(ATTACKS) + ["all"]
    unknown = [a for a in args.attacks if a not in known]
    if unknown:
        raise AttackError(f"unknown attacks {unknown}; known: {known}")
    signals = resolve_signals(args.signals, card, layout)
    query = dict(
        num_images=args.num_images,
        seed=args.seed,
        encoder=args.encoder,
        signals=signals,
        signal_timesteps=args.signal_timesteps,
        accelerator=args.accelerator,
        devices=args.devices,
        progress=args.progress,
    )
    logger = make_logger(str(layout.root), name="attack", job_type="attack", group=layout.name)
    query["logger"] = logger
    target = run_query(args.ckpt, **query)
    shadow_tables = [run_query(str(c), **query) for c in shadows]
    attacks = list(args.attacks)
    if "all" in attacks:
        attacks = ["all"]
    report = run_attacks(
        layout,
        target,
        shadow_tables,
        attacks=attacks,
        setting=args.setting,
        known_fraction=args.known_fraction,
        seed=args.seed,
        max_epochs=args.max_epochs,
        logger=logger,
        progress=args.progress,
        context={
            "family": card.family,
            "num_images": args.num_images,
            "num_shadows": len(shadows),
            "seeds": {"query": args.seed, "attack": args.seed},
            "splits_hash": card.splits_hash,
            **cost_context(target, layout.queries(card.run_name)),
            "target": {
                "run_name": card.run_name,
                "train_steps_per_image": card.train_steps_per_image,
                "augmentation": card.augmentation,
            },
        },
    )
    folder = report_folder(layout, args.setting)
    roc = write_report(folder, report)
    log_report(logger, report, roc)
    print(format_table(report))
    print(f"report: {folder / 'report.json'}, {folder / 'report.md'}, {roc}")
    if wandb_mode_note(layout.root):  # offline: every stage of the experiment wrote a run
        print(f"W&B ran offline; upload every run of the experiment with: wandb sync "
              f"{layout.root}/wandb/offline-run-* {layout.root}/*/wandb/offline-run-*")  # fmt: skip
    return report


def attack_main(args: ArgsType = None) -> Any:
    """`python attack.py --ckpt <target checkpoint> [--attacks ...] [--setting partial]`."""
    parser = attack_parser()
    return run_cli(lambda: run_attack_command(parser.parse_args(args)))


def experiment_main(args: ArgsType = None) -> list:
    """`python -m lightning_mia.experiment <name | config.yaml> [--key value ...]`."""
    import time

    from jsonargparse import ActionConfigFile, ArgumentParser

    from lightning_mia.experiment import OVERFIT_NOTE, config_path, run_experiment

    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m lightning_mia.experiment <name | config.yaml> [...]")

    def run() -> list:
        parser = ArgumentParser(prog="lightning_mia.experiment")
        parser.add_argument("--config", action=ActionConfigFile)
        parser.add_function_arguments(run_experiment)
        cfg = parser.parse_args(["--config", config_path(argv[0]), *argv[1:]])
        start = time.perf_counter()
        kwargs = cfg.as_dict()
        kwargs.pop("config", None)
        reports = run_experiment(**kwargs)
        print(f"experiment {argv[0]} finished in {time.perf_counter() - start:.0f} s")
        if cfg.overfit:
            print(OVERFIT_NOTE)
        return reports

    return run_cli(run)
