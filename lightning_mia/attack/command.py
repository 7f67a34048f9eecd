"""`python attack.py`: query the target and its shadows where needed, run the attacks, report.

    outcome = run_attack(AttackOptions(ckpt="runs/demo/diffusion-target-000/checkpoints/last.ckpt"))

`run_attack(options)` is what `attack.py` and the experiment runner call (`attack.options`
holds `AttackOptions` and its parser). Every model is queried with the same `QuerySpec`; a
finished query is reused, a killed one resumed. The report goes to `attack/` (the shadow
setting with ground-truth captions) or `attack/<setting><caption tag>/`.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.attack.audit import audit_results, check_audit, run_audit
from lightning_mia.attack.cautions import annotate_report
from lightning_mia.attack.controls import control_aucs, control_specs
from lightning_mia.attack.options import PAPER, AttackOptions, dump_attack_options
from lightning_mia.attack.outcome import AttackOutcome, report_results
from lightning_mia.attack.render import write_report
from lightning_mia.attack.report import AttackContext, AttackReport, TargetFacts, read_report
from lightning_mia.attack.runner import run_attacks
from lightning_mia.card import CheckpointError, RunCard, read_card
from lightning_mia.data.splits import Splits, load_splits
from lightning_mia.external.audit import prepare_external
from lightning_mia.graybox import signals_for
from lightning_mia.models.base import FAMILIES
from lightning_mia.models.captioner import captioner_facts, check_captioner
from lightning_mia.paths import ExperimentLayout, atomic_write_bytes, last_checkpoint
from lightning_mia.query.run import Devices, leave_process_group, query_trainer, run_query
from lightning_mia.query.shards import QueryTable, read_complete
from lightning_mia.reporting import log_results, make_logger
from lightning_mia.setlevel import write_dataset_inference
from lightning_mia.specs.attacks import ATTACKS, AttackError, paper_attacks
from lightning_mia.specs.query import QuerySpec
from lightning_mia.stages import StageError
from lightning_mia.terminal import configure_terminal

OPTIONS_YAML = "options.yaml"  # the options of an attack stage run as its own process


def resolved_query(query: QuerySpec, card: RunCard, layout: ExperimentLayout) -> QuerySpec:
    """`query` with its signals named: `all` (every signal of the family), `auto` (those of a
    finished target query of the same caption mode, else all) or names as given."""
    signals = list(query.signals)
    if "auto" in signals:
        done = read_complete(layout.queries(card.run_name, query.tag))
        signals = list(done.spec.signals) if done is not None else ["all"]
    if "all" in signals:
        signals = signals_for(card.family)
    return query.with_updates(signals=tuple(signals))


def attack_names(asked: tuple[str, ...]) -> list[str]:
    """`paper` -> Wu et al.'s four; `all` kept (resolved on the query tables); names checked."""
    names = [n for a in asked for n in (paper_attacks() if a == PAPER else [a])]
    problems = ATTACKS.check([n for n in names if n != "all"])
    if problems:
        raise AttackError(problems[0])
    return ["all"] if "all" in names else list(dict.fromkeys(names))


def target_card(options: AttackOptions) -> tuple[RunCard, ExperimentLayout]:
    """The target's run card and its experiment; CheckpointError for anything else."""
    if not options.ckpt:
        raise CheckpointError(
            "give --ckpt <target checkpoint>, or --external.pipeline with --external.members"
        )
    card = read_card(options.ckpt)
    if card.family not in FAMILIES:
        raise CheckpointError(f"{options.ckpt} is a {card.family} checkpoint, not a target model")
    layout = ExperimentLayout(options.experiment or card.experiment)
    if options.experiment and Path(options.experiment).resolve() != Path(card.experiment).resolve():
        raise CheckpointError(
            f"{options.ckpt} belongs to experiment {card.experiment}, not {options.experiment}"
        )
    return card, layout


def shadow_checkpoints(setting: str, card: RunCard, layout: ExperimentLayout) -> list[Path]:
    """The finished shadows of the target's family; AttackError when the setting needs some."""
    shadows = [last_checkpoint(r) for r in layout.finished_runs(card.family, "shadow")]
    if not shadows and setting == "shadow":
        others = sorted(p.name for p in layout.root.glob("*-shadow-[0-9][0-9][0-9]"))
        hint = f" (found shadows of other families: {others})" if others else ""
        raise AttackError(
            f"no trained {card.family} shadow models in {layout.root}{hint}: train them with "
            f"`python train.py fit --config <config> --data.model_index K` for K = 1, 2, ..."
        )
    return shadows


def holds_target_samples(splits: Splits, model_index: int) -> bool:
    """Whether row `model_index` of splits.json queries every sample the target (row 0) is
    queried on: that shadow's own query then calibrates LiRA, else it is also queried on row 0
    (`queries/<shadow>/row-000/`)."""
    return set(splits.row(0).queries) <= set(splits.row(model_index).queries)


@dataclass(frozen=True)
class Queries:
    """The query tables of one attack run (global rank 0; None on the other ranks)."""

    target: QueryTable | None
    shadows: list[QueryTable]
    calibration: list[QueryTable]
    controls: dict[str, QueryTable]  # the target's control queries, by caption mode


def run_queries(
    options: AttackOptions,
    query: QuerySpec,
    shadows: list[Path],
    layout: ExperimentLayout,
    logger: Logger | bool = False,
) -> Queries:
    """Query the target and every shadow with `query` (each rank its share), and, for LiRA,
    each shadow on the target's samples: its own table where its row of the splits holds them
    all, else a query of row 0 (`queries/<shadow>/row-000/`)."""

    def query_of(ckpt: Path | str, row: int | None = None, spec: QuerySpec = query) -> Any:
        return run_query(
            str(ckpt),
            spec,
            row=row,
            devices=options.devices,
            progress=options.progress,
            logger=logger,
        )

    target = query_of(options.ckpt)
    tables = [query_of(c) for c in shadows]
    calibration = []
    if options.attack.calibrate and options.attack.setting == "shadow":
        splits = load_splits(layout.splits)
        for ckpt, own in zip(shadows, tables):
            covered = holds_target_samples(splits, read_card(ckpt).model_index)
            calibration.append(own if covered else query_of(ckpt, row=0))
    specs = control_specs(query) if options.controls else {}
    controls = {mode: query_of(options.ckpt, spec=spec) for mode, spec in specs.items()}
    leave_process_group()  # the rest runs on rank 0 alone
    return Queries(target, tables, calibration, controls)


def attack_logger(layout: ExperimentLayout, options: AttackOptions) -> Logger:
    """The attack stage's W&B run (or none): in the experiment's group, with every option."""
    config = dataclasses.asdict(options)
    return make_logger(
        str(layout.root), name="attack", job_type="attack", group=layout.name, config=config
    )


def run_attack(options: AttackOptions) -> AttackOutcome | None:
    """Query the target and shadows where needed, train and evaluate the attacks and write
    the report (rank 0); None on the other ranks of a multi-device query."""
    configure_terminal(options.verbose)
    if options.external.pipeline:  # splits, target checkpoint, shadows of an external model
        options = prepare_external(options)
    card, layout = target_card(options)
    settings = options.attack
    attacks = attack_names(settings.attacks)
    shadows = shadow_checkpoints(settings.setting, card, layout)
    query = resolved_query(options.query, card, layout)
    if query.captioner:  # not a captioner, or one of another experiment: before any file
        check_captioner(query.captioner, card.splits_hash)
    if options.dataset_inference or options.group_by:
        check_audit(layout, options)
    logger = attack_logger(layout, options)
    tables = run_queries(options, query, shadows, layout, logger)
    if tables.target is None:  # not global rank zero: rank 0 trains the attacks and reports
        return None
    steps = card.train_steps_per_image or None  # 0: not known (an external target)
    facts, trained = TargetFacts(card.run_name, steps, dict(card.augmentation)), {}
    context = AttackContext.from_tables(tables.target, tables.shadows, settings.seed, facts)

    def attack_on(target: QueryTable) -> AttackReport:
        return run_attacks(
            layout,
            target,
            tables.shadows,
            attacks=attacks,
            setting=settings.setting,
            known_fraction=settings.known_fraction,
            seed=settings.seed,
            max_epochs=settings.max_epochs,
            logger=logger,
            context=context,
            calibration=tables.calibration,
            progress=options.progress and options.verbose,  # short loops: bars when verbose
            trained=trained,  # the main report's fitted attacks score the controls too
        )

    report = attack_on(tables.target)
    report.captions, report.query = query.captions, tables.target.record.spec.to_dict()
    if query.captioner:
        report.captioner = captioner_facts(query.captioner)
    annotate_report(report, card, layout, query.encoder, query.captioner)  # provenance
    folder = layout.report_dir(settings.setting, query.tag)

    def write_control(mode: str, control: AttackReport) -> None:
        write_report(layout.report_dir(settings.setting, f"{query.tag}@{mode}"), control)

    main_spec = tables.target.record.spec
    report.controls = control_aucs(attack_on, tables.controls, main_spec, write_control)
    if options.dataset_inference:
        report.dataset_inference = dataset_inference(
            options, layout, tables, folder, logger, report
        )
    write_report(folder, report)
    log_results(logger, report_results(report, folder))
    return AttackOutcome(report, folder, layout)


def dataset_inference(
    options: AttackOptions,
    layout: ExperimentLayout,
    tables: Any,
    folder: Path,
    logger: Logger,
    report: AttackReport,
) -> dict:
    """The set-level audit of the target's members (its JSON, figure and W&B rows written),
    as the report records it."""
    result = run_audit(layout, tables.target, tables.shadows, options, report, tables.calibration)
    write_dataset_inference(folder, result)
    log_results(logger, audit_results(result, folder))
    return result.to_dict()


def relaunches_command(devices: Devices) -> bool:
    """Whether a query Trainer of these settings starts its other ranks by running this
    process's command line again (Lightning's DDP script launcher: `ddp`, or `auto` on several
    devices), rather than in workers (`ddp_spawn`) or not at all (one device; ranks started
    by torchrun or SLURM)."""
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    probe = query_trainer(devices)  # builds, launches nothing
    environment = getattr(probe.strategy, "cluster_environment", None)
    external = environment is not None and environment.creates_processes_externally
    return isinstance(probe.strategy.launcher, _SubprocessScriptLauncher) and not external


def run_attack_stage(options: AttackOptions) -> AttackOutcome | None:
    """`run_attack`, or, when its queries would re-launch the command line
    (`relaunches_command`), `python -m lightning_mia.attack --config <its options>` (=
    `attack.py`, which prints its table) as its own process, so the DDP launcher re-runs that
    command and not the caller's; the report is then read back from its report.json."""
    if not relaunches_command(options.devices):
        return run_attack(options)
    layout = ExperimentLayout(options.experiment)
    folder = layout.report_dir(options.attack.setting, options.query.tag)
    config = folder / OPTIONS_YAML
    atomic_write_bytes(config, dump_attack_options(options).encode("utf-8"))
    argv = [sys.executable, "-m", "lightning_mia.attack", "--config", str(config)]
    rank_zero_info(f"[attack] in its own process: {' '.join(argv[1:])}")
    code = subprocess.run(argv).returncode
    if code:
        raise StageError(f"the attack stage failed (exit code {code}; its error is above)")
    return AttackOutcome(read_report(folder), folder, layout, shown=True)
