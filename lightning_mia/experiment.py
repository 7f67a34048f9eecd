"""Run a whole experiment, stage by stage, resumably: `python -m lightning_mia.experiment demo`.

    python -m lightning_mia.experiment demo                         # configs/experiments/demo.yaml
    python -m lightning_mia.experiment configs/experiments/coco-diffusion.yaml \
        --trainer_args '[--trainer.devices=8, --trainer.strategy=ddp]' --isolate true

Stages, each skipped when its folder says it is done (`DONE.json`, `COMPLETE.json`):
autoencoder, attacker's encoder and captioner -> target (row 0) and shadows (rows 1..K) ->
queries -> attack, once per setting and caption mode. The query of every model is the
config's `query:` group (a `QuerySpec`), the attack stage's settings its `attack:` group.
Caption modes (`captions:`): ground-truth, captioner (with `captioner:`, a stage config or a
ready BLIP folder) and the controls fixed-caption and swapped-caption; their reports are
compared side by side. With `repeats: R` the whole experiment runs R times (repeat r >= 1 in
`<experiment>/repeat-0r/` with seed + r) and `attack/repeats.{json,md}` hold mean ± sd.
Training stages are LightningCLI runs (`train.py fit` arguments, in this process or, with
`isolate: true` or `parallel` > 1, as their own processes, which DDP and clusters need).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import ArgsType
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.attack.command import run_attack_stage
from lightning_mia.attack.options import ALIASES, AttackOptions, AttackSettings
from lightning_mia.attack.outcome import AttackOutcome, show_outcome
from lightning_mia.attack.render import format_comparison
from lightning_mia.attack.repeats import format_repeats, summarize_repeats, write_repeats
from lightning_mia.cli import train_main
from lightning_mia.errors import UserError
from lightning_mia.models.base import DEFAULT_FAMILY
from lightning_mia.paths import ExperimentLayout, find_config
from lightning_mia.query.run import Devices
from lightning_mia.reporting import finish_wandb_run
from lightning_mia.setlevel import AuditOptions
from lightning_mia.specs.query import CAPTION_MODES, QuerySpec
from lightning_mia.stages import fit_arguments, run_fit_process, run_fit_processes
from lightning_mia.terminal import (
    add_verbose_argument,
    argument_parser,
    configure_terminal,
    normalized_argv,
    run_cli,
    say,
    verbose_requested,
)

CONFIG_DIR = Path("configs/experiments")
OVERFIT_NOTE = (
    "Note: this experiment is a deliberately overfit regime (few members, hundreds of training "
    "steps per image), where leakage is large by design. For a realistic regime (about 20 "
    "steps per image with crop/flip augmentation) run: "
    "python -m lightning_mia.experiment shapes-diffusion-realistic"
)


@dataclass(frozen=True)
class StageConfigs:
    """The training stages of an experiment: each a `train.py fit` config ("" = none).

    Args:
        autoencoder: the image autoencoder ("" = the model config's `autoencoder` folder).
        encoder: the attacker's image-text encoder ("" when `query.encoder` names a CLIP).
        captioner: the attacker's captioner: a stage config (trained into
            `<experiment>/captioner/`) or a ready BLIP folder; "" = none.
        model: the target and shadow models.
        data_args: `train.py` arguments for the data of every stage (`--data.source...`).
        model_args: `train.py` arguments for the target and shadows only.
        trainer_args: `train.py` arguments for every training stage (devices, strategy...).
        isolate: run each training stage as its own process (what strategy=ddp needs).
        parallel: the autoencoder (which every model needs) trains first with every CPU
            thread; then the other stages (encoder, captioner, target and shadows: none
            needs another) run as this many processes at once, each with its share of the
            threads (> 1 implies isolate; for small models on few cores).
    """

    autoencoder: str = "configs/autoencoder/tiny.yaml"
    encoder: str = "configs/encoder/tiny.yaml"
    captioner: str = ""
    model: str = "configs/diffusion/tiny.yaml"
    data_args: list[str] = field(default_factory=list)
    model_args: list[str] = field(default_factory=list)
    trainer_args: list[str] = field(default_factory=list)
    isolate: bool = False
    parallel: int = 1


def fit_stage(folder: Path, config: str, args: list[str], isolate: bool) -> None:
    """Train one stage unless `folder` is done; resume from its last.ckpt if it has one."""
    argv = fit_arguments(folder, find_config(config), args)
    if argv is None:
        return
    start = time.perf_counter()
    if isolate:  # its own process (what DDP's launcher and clusters need), from any folder
        run_fit_process(folder, argv)
    else:
        with warnings.catch_warnings():  # LightningCLI(args=...) inside another command line
            warnings.filterwarnings("ignore", message=".*args parameter is intended.*")
            train_main(argv)
        finish_wandb_run()  # each stage is its own W&B run, also in one process
    rank_zero_info(f"[fit] {folder.name} done in {time.perf_counter() - start:.0f} s")


def stage_arguments(
    folder: str | os.PathLike,
    stages: StageConfigs,
    extra: Sequence[str] = (),
    verbose: bool = False,
) -> list[str]:
    """The `train.py fit` arguments every training stage of the experiment in `folder` shares
    (its data and trainer arguments, then `extra`: a repeat's seeds)."""
    common = [f"--data.experiment={folder}", *stages.data_args, *stages.trainer_args, *extra]
    return common + (["--verbose"] if verbose else [])


def train_stages(
    layout: ExperimentLayout,
    family: str,
    num_shadows: int,
    stages: StageConfigs,
    common: list[str],
    given_encoder: bool = False,
) -> None:
    """An experiment's training stages (`experiment.StageConfigs`): autoencoder, attacker's
    encoder (unless `given_encoder`) and captioner (a stage config), then target and shadows,
    each skipped when done. With `stages.parallel` > 1 the autoencoder trains alone with
    every thread (the models wait for it), then all the others, which do not depend on each
    other, as that many processes at once: no core waits while one stage holds up the next
    (2 cores, the demo: autoencoder ‖ encoder, then three models, left one core idle for a
    minute)."""
    first, shared = [], []
    if stages.autoencoder:
        first.append((layout.autoencoder, stages.autoencoder, common))
    if stages.encoder and not given_encoder:
        shared.append((layout.encoder, stages.encoder, common))
    if Path(stages.captioner).suffix in (".yaml", ".yml"):
        shared.append((layout.captioner, stages.captioner, common))
    models = []
    for index in range(num_shadows + 1):
        args = [*common, f"--data.model_index={index}"]
        if stages.autoencoder:  # the autoencoder this experiment trained, not a config's
            args.append(f"--model.init_args.autoencoder={layout.autoencoder}")
        models.append((layout.run_dir(family, index), stages.model, [*args, *stages.model_args]))
    if stages.parallel <= 1:
        for folder, config, args in [*first, *shared, *models]:
            fit_stage(folder, config, args, stages.isolate)
        return
    for phase, parallel in ((first, 1), (models + shared, stages.parallel)):
        jobs = [(f, argv) for f, c, a in phase if (argv := fit_arguments(f, find_config(c), a))]
        start = time.perf_counter()
        run_fit_processes(jobs, parallel)
        if jobs:
            names = ", ".join(f.name for f, _ in jobs)
            rank_zero_info(f"[fit] {names} done in {time.perf_counter() - start:.0f} s")


def attack_stage(options: AttackOptions) -> AttackOutcome | None:
    """One attack stage of the experiment (its own W&B run), timed on the terminal."""
    what = f"{options.attack.setting} setting{options.query.tag}"
    rank_zero_info(f"[attack] {what}: {', '.join(options.attack.attacks)}")
    start = time.perf_counter()
    outcome = run_attack_stage(options)
    finish_wandb_run()
    rank_zero_info(f"[attack] {what} done in {time.perf_counter() - start:.0f} s")
    return outcome


def repeat_runs(experiment: str, seed: int, repeats: int) -> list[tuple[str, int, list[str]]]:
    """(folder, seed, extra arguments of every training stage) of each repeat.

    Repeat 0 is the experiment as configured, in its own folder; repeat r >= 1 is a complete
    experiment in `<experiment>/repeat-<r:02d>/` whose splits (`--data.seed`), training
    (`--seed_everything`), queries and attacks all use seed + r.
    """
    if repeats < 1:
        raise UserError(f"repeats must be >= 1, got {repeats}")
    runs = [(experiment, seed, [])]
    for r in range(1, repeats):
        folder, s = str(Path(experiment) / f"repeat-{r:02d}"), seed + r
        runs.append((folder, s, [f"--data.seed={s}", f"--seed_everything={s}"]))
    return runs


def caption_queries(
    query: QuerySpec, captions: list[str], captioner: str, layout: ExperimentLayout
) -> list[QuerySpec]:
    """The query of each caption mode asked (default: captioner when `captioner` is set,
    else ground-truth); a captioner stage config is trained into `<experiment>/captioner/`."""
    modes = list(captions or (["captioner"] if captioner else ["ground-truth"]))
    unknown = [m for m in modes if m not in CAPTION_MODES]
    if unknown:
        raise UserError(f"captions: unknown mode {unknown[0]!r}; known: {list(CAPTION_MODES)}")
    if "captioner" in modes and not captioner:
        raise UserError("captions: 'captioner' needs the experiment key captioner: <config|folder>")
    folder = str(layout.captioner) if is_stage_config(captioner) else captioner
    return [
        query.with_updates(captions=m, captioner=folder if m == "captioner" else "") for m in modes
    ]


def is_stage_config(path: str) -> bool:
    """A stage's YAML config (trained here), not a ready model folder."""
    return Path(path).suffix in (".yaml", ".yml")


def _summarize(
    experiment: str,
    plans: list[AttackOptions],
    runs: list[tuple[str, int, list[str]]],
    outcomes: list[AttackOutcome | None],
) -> None:
    """repeats.json / repeats.md of each (setting, caption mode) beside repeat 0's report."""
    if any(o is None for o in outcomes):
        return
    for j, options in enumerate(plans):
        reports = [outcomes[r * len(plans) + j].report for r in range(len(runs))]
        summary = summarize_repeats(reports, [f for f, _, _ in runs], [s for _, s, _ in runs])
        folder = ExperimentLayout(experiment).report_dir(options.attack.setting, options.query.tag)
        path = write_repeats(folder, summary)
        say(format_repeats(summary))
        say(f"repeats: {path}, {path.with_suffix('.md')}")


def run_experiment(
    experiment: str = "runs/demo",
    family: str = DEFAULT_FAMILY,
    num_shadows: int = 2,
    stages: StageConfigs = StageConfigs(),
    query: QuerySpec = QuerySpec(signals=("auto",)),
    attack: AttackSettings = AttackSettings(),
    settings: list[str] | None = None,
    captions: list[str] | None = None,
    devices: Devices = Devices(),
    controls: bool = False,
    dataset_inference: bool = False,
    group_by: str = "",
    audit: AuditOptions = AuditOptions(),
    seed: int = 0,
    repeats: int = 1,
    overfit: bool = False,
    verbose: bool = False,
) -> list[AttackOutcome | None]:
    """Run every stage of one experiment in order; returns the attack outcomes (one a setting,
    caption mode and repeat; None on ranks other than zero).

    Args:
        experiment: experiment folder (splits, runs, queries, attack reports).
        family: model family of target and shadows (diffusion | seq2seq | ...).
        num_shadows: shadow models trained (rows 1..K of splits.json).
        stages: the training stages and their `train.py` arguments.
        query: what every model is queried with (its seed is replaced by `seed`).
        attack: what the attack stage does (setting and seed replaced by `settings`, `seed`).
        settings: attacker settings reported: shadow and/or partial (default: shadow).
        captions: caption modes attacked, a report each: ground-truth, captioner,
            fixed-caption, swapped-caption (default: captioner when a captioner is set).
        devices: where the attack stage's queries run; on several devices `ddp` / `auto` run
            the attack stage as its own process (`attack.command.run_attack_stage`).
        controls: also query each target with a fixed and with swapped captions and report
            how much of each attack's AUC survives (`attack.controls`).
        dataset_inference: the set-level audit of each target's members against its
            non-members (`lightning_mia.setlevel`).
        group_by: a column of the data source: one audit per group (Benjamini-Hochberg).
        audit: how the set-level audit tests.
        seed: seed of splits, training, queries and attacks (repeat r >= 1: seed + r).
        repeats: R >= 2 runs the whole experiment R times (`repeat_runs`) and writes mean ±
            sd across them beside the bootstrap interval (attack/repeats.json and .md).
        overfit: the experiment is a deliberately overfit regime (its output says so).
        verbose: every stage shows every message of Lightning, W&B and the model libraries.
    """
    del overfit  # read by the command line, which prints OVERFIT_NOTE
    runs = repeat_runs(experiment, seed, repeats)
    outcomes, plans = [], []
    for folder, run_seed, extra in runs:
        layout = ExperimentLayout(folder)
        queries = caption_queries(
            query.with_updates(seed=run_seed), captions or [], stages.captioner, layout
        )
        plans = [
            AttackOptions(
                ckpt=str(layout.checkpoint(family, 0)),
                experiment=folder,
                attack=replace(attack, setting=setting, seed=run_seed),
                query=q,
                devices=devices,
                controls=controls,
                dataset_inference=dataset_inference,
                group_by=group_by,
                audit=audit,
                verbose=verbose,
            )
            for setting in settings or ["shadow"]
            for q in queries
        ]
        common = stage_arguments(folder, stages, extra, verbose)
        train_stages(layout, family, num_shadows, stages, common, bool(query.encoder))
        outcomes += [attack_stage(options) for options in plans]
    if repeats > 1:
        _summarize(experiment, plans, runs, outcomes)
    return outcomes


def show_comparisons(outcomes: list[AttackOutcome | None]) -> None:
    """The reports of each experiment folder and setting in their caption modes side by side
    (the paper's comparison of the attackers, and the controls), on the terminal."""
    groups: dict[tuple[str, str], list] = {}
    for outcome in filter(None, outcomes):
        key = (str(outcome.layout.root), outcome.report.setting)
        groups.setdefault(key, []).append(outcome.report)
    for reports in groups.values():
        if len({r.captions for r in reports}) > 1:
            say(format_comparison(reports))


def config_path(name: str) -> str:
    """A named experiment (`demo`) or a path to its YAML, in the working folder or else in the
    installed package (`paths.find_config`); FileNotFoundError lists the names."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not Path(find_config(path)).is_file():
            raise FileNotFoundError(f"experiment config {path}: no such file")
        return find_config(path)
    named = Path(find_config(CONFIG_DIR / f"{name}.yaml"))
    if not named.is_file():
        known = sorted(p.stem for p in Path(find_config(CONFIG_DIR)).glob("*.yaml"))
        raise FileNotFoundError(f"no experiment {name!r} ({named} missing); known: {known}")
    return str(named)


EXPERIMENT_LISTS = ["settings", "captions", "attack.attacks", "query.signals"]
EXPERIMENT_LISTS += [f"stages.{k}" for k in ("data_args", "model_args", "trainer_args")]
EXPERIMENT_FLAGS = ["verbose", "overfit", "controls", "dataset_inference"]


def experiment_parser() -> Any:
    """The parser of `python -m lightning_mia.experiment`: `--config` and `run_experiment`'s
    arguments, nested groups included (`--query.num_images 8`, `--attack.attacks all`)."""
    from jsonargparse import ActionConfigFile

    parser = argument_parser(
        prog="lightning_mia.experiment",
        description="Run an experiment stage by stage, resumably: lightning_mia.experiment "
        "<name of configs/experiments/ | config.yaml> [--key value ...]",
    )
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(run_experiment, skip={"verbose"})
    add_verbose_argument(parser)
    return parser


def experiment_config(argv: list[str]) -> Any:
    """The parsed config of `<name | config.yaml> [--key value ...]` (bare-word lists and lone
    flags too): the named experiment's YAML, then the overrides."""
    rest = normalized_argv(argv[1:], EXPERIMENT_LISTS, EXPERIMENT_FLAGS, ALIASES)
    return experiment_parser().parse_args(["--config", config_path(argv[0]), *rest])


def experiment_main(args: ArgsType = None) -> list[AttackOutcome | None]:
    """`python -m lightning_mia.experiment <name | config.yaml> [--key value ...]`."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] in (["-h"], ["--help"]):
        experiment_parser().print_help()
        raise SystemExit(0)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m lightning_mia.experiment <name | config.yaml> [...]")
    configure_terminal(verbose_requested(argv))

    def run() -> list[AttackOutcome | None]:
        cfg = experiment_config(argv)
        configure_terminal(cfg.verbose)
        start = time.perf_counter()
        kwargs = dict(experiment_parser().instantiate(cfg))
        kwargs.pop("config", None)
        outcomes = run_experiment(**kwargs)
        for outcome in filter(None, outcomes):
            if not outcome.shown:
                show_outcome(outcome)
        show_comparisons(outcomes)
        say(f"experiment {argv[0]} finished in {time.perf_counter() - start:.0f} s")
        if cfg.overfit:
            say(OVERFIT_NOTE)
        return outcomes

    return run_cli(run)


if __name__ == "__main__":
    experiment_main()
