"""Run a whole experiment, stage by stage, resumably: `python -m lightning_mia.experiment demo`.

    python -m lightning_mia.experiment demo                         # configs/experiments/demo.yaml
    python -m lightning_mia.experiment configs/experiments/coco-diffusion.yaml \
        --trainer_args '[--trainer.devices=8, --trainer.strategy=ddp]' --isolate true

Stages, each skipped when its folder says it is done (`DONE.json`, `COMPLETE.json`):
autoencoder, attacker's encoder and captioner -> target (row 0) and shadows (rows 1..K) ->
queries -> attack. With `captioner:` (a stage config or a ready BLIP folder) and `captions:
[ground-truth, captioner]` both attackers are reported and compared side by side.
With `repeats: R` the whole experiment runs R times (repeat r >= 1 in `<experiment>/repeat-0r/`
with seed + r) and `attack/repeats.{json,md}` hold mean ± sd across the repeats.
A stage interrupted midway resumes from its `last.ckpt` (training) or its shards (queries).
With `isolate: true` each training stage runs as its own `python -m lightning_mia.cli fit ...`
process (the same command line as `python train.py fit ...`), which is what multi-GPU DDP
(`strategy: ddp`) and clusters need; otherwise they run in this process.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch.cli import ArgsType
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.attack.command import (
    AttackOptions,
    AttackOutcome,
    attack_argv,
    run_attack,
    split_names,
)
from lightning_mia.attack.render import format_comparison
from lightning_mia.attack.repeats import format_repeats, summarize_repeats, write_repeats
from lightning_mia.attack.report import read_report
from lightning_mia.cli import find_config, run_cli, say, show_outcome, train_main
from lightning_mia.errors import UserError
from lightning_mia.paths import ExperimentLayout, caption_tag
from lightning_mia.reporting import finish_wandb_run
from lightning_mia.specs.attacks import paper_attacks
from lightning_mia.stages import StageError, fit_arguments, run_fit_process, run_fit_processes
from lightning_mia.terminal import (
    add_verbose_argument,
    argument_parser,
    configure_terminal,
    verbose_requested,
)

CONFIG_DIR = Path("configs/experiments")
CAPTION_MODES = ("ground-truth", "captioner")  # what the attacker queries the target with


OVERFIT_NOTE = (
    "Note: this experiment is a deliberately overfit regime (few members, hundreds of training "
    "steps per image), where leakage is large by design. For a realistic regime (about 20 "
    "steps per image with crop/flip augmentation) run: "
    "python -m lightning_mia.experiment shapes-diffusion-realistic"
)


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


def relaunches_command(accelerator: str, devices: int | str, strategy: str) -> bool:
    """Whether a Trainer of these settings starts its other ranks by running this process's
    command line again (Lightning's DDP script launcher: `ddp`, or `auto` on several devices,
    e.g. `devices: auto` on a multi-GPU node), rather than in workers (`ddp_spawn`) or not at
    all (one device; ranks started by torchrun or SLURM)."""
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    from lightning_mia.query.run import query_trainer

    probe = query_trainer(accelerator, devices, strategy)  # builds, launches nothing
    environment = getattr(probe.strategy, "cluster_environment", None)
    external = environment is not None and environment.creates_processes_externally
    return isinstance(probe.strategy.launcher, _SubprocessScriptLauncher) and not external


def attack_stage(options: AttackOptions) -> AttackOutcome | None:
    """The attack stage: queries, attacks, report. When its queries would re-launch the
    command line (`relaunches_command`), it runs as its own `python -m
    lightning_mia.attack` process (= `attack.py`, which prints its table), so the DDP
    launcher re-runs that command and not the whole experiment; the report is then read back
    from its report.json."""
    if not relaunches_command(options.accelerator, options.devices, options.strategy):
        return run_attack(options)
    argv = [sys.executable, "-m", "lightning_mia.attack", *attack_argv(options)]
    rank_zero_info(f"[attack] in its own process: {' '.join(argv[1:])}")
    code = subprocess.run(argv).returncode
    if code:
        raise StageError(f"the attack stage failed (exit code {code}; its error is above)")
    layout = ExperimentLayout(options.experiment)
    folder = layout.report_dir(options.setting, options.captioner)
    return AttackOutcome(read_report(folder), folder, layout, shown=True)


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


def is_stage_config(path: str) -> bool:
    """A stage's YAML config (trained here), not a ready model folder."""
    return Path(path).suffix in (".yaml", ".yml")


def caption_runs(captioner: str, captions: list[str] | None, layout: ExperimentLayout) -> list:
    """The captioner folder of each caption mode asked ("" = ground-truth captions): the
    experiment's `captioner/` when `captioner` is a stage config, else the folder given."""
    modes = list(captions or (["captioner"] if captioner else ["ground-truth"]))
    unknown = [m for m in modes if m not in CAPTION_MODES]
    if unknown:
        raise UserError(f"captions: unknown mode {unknown[0]!r}; known: {list(CAPTION_MODES)}")
    if "captioner" in modes and not captioner:
        raise UserError("captions: 'captioner' needs the experiment key captioner: <config|folder>")
    folder = str(layout.captioner) if is_stage_config(captioner) else captioner
    return [folder if m == "captioner" else "" for m in modes]


def _train_stages(
    layout: ExperimentLayout,
    family: str,
    num_shadows: int,
    autoencoder: str,
    encoder: str,
    clip: str,
    model: str,
    common: list[str],
    model_args: list[str],
    isolate: bool,
    parallel: int = 1,
    captioner: str = "",
) -> None:
    """Autoencoder, attacker's encoder and captioner (a stage config), then target and
    shadows, each skipped when done; with `parallel` > 1 the stages of each phase (they do not
    depend on each other) run as that many processes at once."""
    shared = []
    if autoencoder:
        shared.append((layout.autoencoder, autoencoder, common))
    if encoder and not clip:
        shared.append((layout.encoder, encoder, common))
    if is_stage_config(captioner):
        shared.append((layout.captioner, captioner, common))
    models = []
    for index in range(num_shadows + 1):
        args = [*common, f"--data.model_index={index}"]
        if autoencoder:  # the autoencoder this experiment trained, not a config's default path
            args.append(f"--model.init_args.autoencoder={layout.autoencoder}")
        models.append((layout.run_dir(family, index), model, [*args, *model_args]))
    for phase in (shared, models):
        if parallel <= 1:
            for folder, config, args in phase:
                fit_stage(folder, config, args, isolate)
            continue
        jobs = [(f, argv) for f, c, a in phase if (argv := fit_arguments(f, find_config(c), a))]
        start = time.perf_counter()
        run_fit_processes(jobs, parallel)
        if jobs:
            names = ", ".join(f.name for f, _ in jobs)
            rank_zero_info(f"[fit] {names} done in {time.perf_counter() - start:.0f} s")


def _summarize(
    experiment: str,
    attacks: list[tuple[str, str]],
    runs: list[tuple[str, int, list[str]]],
    outcomes: list[AttackOutcome | None],
) -> None:
    """repeats.json / repeats.md of each (setting, captioner) beside repeat 0's report (rank
    zero)."""
    if any(o is None for o in outcomes):
        return
    for j, (setting, captioner) in enumerate(attacks):
        reports = [outcomes[r * len(attacks) + j].report for r in range(len(runs))]
        summary = summarize_repeats(reports, [f for f, _, _ in runs], [s for _, s, _ in runs])
        path = write_repeats(ExperimentLayout(experiment).report_dir(setting, captioner), summary)
        say(format_repeats(summary))
        say(f"repeats: {path}, {path.with_suffix('.md')}")


def run_experiment(
    experiment: str = "runs/demo",
    family: str = "diffusion",
    num_shadows: int = 2,
    autoencoder: str = "configs/autoencoder/tiny.yaml",
    encoder: str = "configs/encoder/tiny.yaml",
    clip: str = "",
    captioner: str = "",
    captions: list[str] | None = None,
    model: str = "configs/diffusion/tiny.yaml",
    data_args: list[str] | None = None,
    model_args: list[str] | None = None,
    trainer_args: list[str] | None = None,
    num_images: int = 4,
    attacks: list[str] | None = None,
    settings: list[str] | None = None,
    known_fraction: float = 0.5,
    seed: int = 0,
    isolate: bool = False,
    overfit: bool = False,
    repeats: int = 1,
    parallel: int = 1,
    query_accelerator: str = "auto",
    query_devices: int | str = "auto",
    query_strategy: str = "auto",
    verbose: bool = False,
) -> list[AttackOutcome | None]:
    """Run every stage of one experiment in order; returns the attack outcomes (one a setting
    and repeat, repeat by repeat; None on ranks other than zero).

    Args:
        experiment: experiment folder (splits, runs, queries, attack report).
        family: model family of target and shadows: diffusion | seq2seq.
        num_shadows: shadow models trained (rows 1..K of splits.json).
        autoencoder: config of the image autoencoder stage ("" = use the model config's
            `autoencoder` folder as is, e.g. a pretrained one).
        encoder: config of the attacker's encoder stage ("" when `clip` is given).
        clip: local folder of a pretrained CLIP model to use instead of training an encoder.
        captioner: the attacker's captioner: a stage config (`configs/captioner/tiny.yaml`,
            trained into `<experiment>/captioner/`) or a ready BLIP folder; "" = none.
        captions: caption modes attacked, each a report: ground-truth and/or captioner
            (default: captioner when `captioner` is set, else ground-truth).
        model: config of the target/shadow model stage.
        data_args: extra CLI arguments for the data of every stage (`--data.source...`).
        model_args: extra CLI arguments for the target/shadow stage only.
        trainer_args: extra CLI arguments for every training stage (devices, strategy...).
        num_images: images generated per query (N).
        attacks: attacks to run (default: the paper's four, `specs.attacks.paper_attacks`).
        settings: attacker settings to report: shadow and/or partial.
        known_fraction: fraction of the target's queries known in the partial setting.
        seed: seed of queries and attack training (repeat r >= 1: also splits and training,
            seed + r).
        isolate: run each training stage as its own process (needed for strategy=ddp).
        overfit: the experiment is a deliberately overfit regime (its output says so).
        repeats: R >= 2 runs the whole experiment R times (`repeat_runs`: new splits, target,
            shadows, queries and attacks each) and writes mean ± sd across them beside the
            bootstrap interval, as attack/repeats.json and repeats.md.
        parallel: training stages that do not depend on each other (autoencoder and encoder;
            then target and shadows) run as this many processes at once, each with its share
            of the CPU threads (> 1 implies isolate; for small models on few cores).
        query_accelerator: Lightning accelerator of the attack stage's queries.
        query_devices: its devices (`auto`: every GPU of the node, else one CPU process).
        query_strategy: its strategy; on several devices `ddp` / `auto` run the attack stage
            as its own process (`attack_stage`), `ddp_spawn` in this one.
        verbose: every stage shows every message of Lightning, W&B and the model libraries.
    """
    del overfit  # read by the command line, which prints OVERFIT_NOTE
    settings = list(settings or ["shadow"])
    runs = repeat_runs(experiment, seed, repeats)
    outcomes = []
    for folder, run_seed, extra in runs:
        layout = ExperimentLayout(folder)
        plan = [(s, c) for s in settings for c in caption_runs(captioner, captions, layout)]
        common = [f"--data.experiment={folder}", *(data_args or []), *(trainer_args or []), *extra]
        common += ["--verbose"] if verbose else []
        _train_stages(
            layout,
            family,
            num_shadows,
            autoencoder,
            encoder,
            clip,
            model,
            common,
            list(model_args or []),
            isolate,
            parallel,
            captioner,
        )
        for setting, caption_folder in plan:
            options = AttackOptions(
                ckpt=str(layout.checkpoint(family, 0)),
                experiment=folder,
                attacks=list(attacks or paper_attacks()),
                setting=setting,
                known_fraction=known_fraction,
                num_images=num_images,
                seed=run_seed,
                encoder=clip,
                captioner=caption_folder,
                accelerator=query_accelerator,
                devices=query_devices,
                strategy=query_strategy,
                verbose=verbose,
            )
            what = f"{setting} setting{caption_tag(caption_folder)}"
            rank_zero_info(f"[attack] {what}: {', '.join(options.attacks)}")
            start = time.perf_counter()
            outcomes.append(attack_stage(options))
            finish_wandb_run()
            rank_zero_info(f"[attack] {what} done in {time.perf_counter() - start:.0f} s")
    if repeats > 1:
        _summarize(experiment, plan, runs, outcomes)
    return outcomes


def show_comparisons(outcomes: list[AttackOutcome | None]) -> None:
    """The ground-truth and captioner reports of each experiment folder and setting side by
    side (the paper's comparison of the two attackers), on the terminal."""
    groups: dict[tuple[str, str], list] = {}
    for outcome in filter(None, outcomes):
        key = (str(outcome.layout.root), outcome.report.setting)
        groups.setdefault(key, []).append(outcome.report)
    for reports in groups.values():
        if len({r.captions for r in reports}) > 1:
            say(format_comparison(reports))


def config_path(name: str) -> str:
    """A named experiment (`demo`) or a path to its YAML, in the working folder or else in the
    installed package (`cli.find_config`); FileNotFoundError lists the names."""
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


def experiment_parser() -> Any:
    """The parser of `python -m lightning_mia.experiment`: `--config` and `run_experiment`'s
    arguments (`--verbose` also alone; `--attacks` / `--settings` also as bare words)."""
    from jsonargparse import ActionConfigFile

    parser = argument_parser(
        prog="lightning_mia.experiment",
        description="Run an experiment stage by stage, resumably: lightning_mia.experiment "
        "<name of configs/experiments/ | config.yaml> [--key value ...]",
    )
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(
        run_experiment, skip={"verbose", "attacks", "settings", "captions"}
    )
    attacks = "attacks: names, `all`, or '[pixel, semantic]' (default: the paper's four)"
    parser.add_argument("--attacks", nargs="*", type=str, default=None, help=attacks)
    settings = "attacker settings: shadow and/or partial (default: shadow)"
    parser.add_argument("--settings", nargs="*", type=str, default=None, help=settings)
    captions = "caption modes: ground-truth and/or captioner (default: captioner if set)"
    parser.add_argument("--captions", nargs="*", type=str, default=None, help=captions)
    add_verbose_argument(parser)
    return parser


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
        cfg = experiment_parser().parse_args(["--config", config_path(argv[0]), *argv[1:]])
        configure_terminal(cfg.verbose)
        start = time.perf_counter()
        kwargs = cfg.as_dict()
        kwargs.pop("config", None)
        for name in ("attacks", "settings", "captions"):  # `--attacks pixel semantic` too
            kwargs[name] = split_names(kwargs[name]) or None
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
