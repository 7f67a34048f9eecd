"""`python attack.py`: query the target and its shadows where needed, run the attacks, report.

    python attack.py --ckpt runs/demo/diffusion-target-000/checkpoints/last.ckpt
    python attack.py --ckpt ... --attacks all                 # + the gray-box attacks
    python attack.py --ckpt ... --attacks pixel semantic      # or '[pixel, semantic]'
    python attack.py --ckpt ... --setting partial --known-fraction 0.5
    python attack.py --ckpt ... --captioner runs/demo/captioner   # image-only: its captions
    python attack.py --ckpt ... --calibrate false             # no shadow queries on the target's
                                                              # samples (no offline LiRA)
    python attack.py --pipeline /models/sd-v1-5 --lora my_lora/ --members members.jsonl \
        --non-members non_members.jsonl --experiment runs/audit     # a model trained elsewhere

`AttackOptions` is the command's whole configuration (its fields are the command line, built by
`attack_parser`); `run_attack(options)` is what `attack.py` and the experiment runner call.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_mia.attack.cautions import annotate_report
from lightning_mia.attack.render import write_report
from lightning_mia.attack.report import AttackContext, AttackReport, TargetFacts
from lightning_mia.attack.runner import SETTINGS, run_attacks
from lightning_mia.card import CheckpointError, RunCard, read_card
from lightning_mia.external.audit import prepare_external
from lightning_mia.graybox import signals_for
from lightning_mia.models.base import FAMILIES
from lightning_mia.models.captioner import captioner_facts, check_captioner
from lightning_mia.paths import ExperimentLayout, last_checkpoint
from lightning_mia.query.run import leave_process_group, run_query
from lightning_mia.query.shards import read_complete
from lightning_mia.reporting import log_report, make_logger
from lightning_mia.specs.attacks import ATTACKS, AttackError, paper_attacks
from lightning_mia.terminal import argument_parser, configure_terminal


def _help(text: str, default: Any = dataclasses.MISSING) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class AttackOptions:
    """Everything `attack.py` takes (each field is a `--flag`; `--config` reads them from YAML)."""

    ckpt: str = _help("target model checkpoint (its run card names the experiment)", "")
    experiment: str = _help("experiment folder (default: the checkpoint's)", "")
    attacks: list[str] = _help(
        "attacks: names, `all`, or a list ('[pixel, semantic]')", tuple(paper_attacks())
    )
    setting: str = _help(f"attacker setting: {' | '.join(SETTINGS)}", "shadow")
    known_fraction: float = _help("partial setting: share of the target's rows known", 0.5)
    num_images: int = _help("images generated per query caption (N)", 4)
    seed: int = _help("seed of queries, attack data splits, attack init and bootstrap", 0)
    max_epochs: int = _help("attack training cap (early stopping usually ends it)", 200)
    encoder: str = _help("local CLIP folder (default: the experiment's encoder/)", "")
    captioner: str = _help(
        "BLIP captioner folder: the attacker holds only the image, every query and gray-box "
        "signal uses its captions (default: the ground-truth captions)",
        "",
    )
    signals: list[str] = _help(
        "gray-box signals computed while querying: all | auto (those of a finished target "
        "query, else all) | names; none = no --signals values",
        ("auto",),
    )
    signal_timesteps: list[int] | None = _help(
        "diffusion timesteps of loss and pia (CLiD has its own)", None
    )
    calibrate: bool = _help(
        "shadow setting: also query each shadow on the target's samples, for offline LiRA of "
        "every attack",
        True,
    )
    accelerator: str = _help("Lightning accelerator of the queries", "auto")
    devices: int | str = _help("Lightning devices of the queries (per node)", "auto")
    strategy: str = _help("Lightning strategy of the queries: auto | ddp | ddp_spawn", "auto")
    num_nodes: int = _help("nodes of the queries (a cluster job: srun, torchrun)", 1)
    progress: bool = _help("show progress bars", True)
    # an external target (lightning_mia.external): a diffusers folder and its member lists
    pipeline: str = _help("external target: StableDiffusionPipeline folder (with --lora: base)", "")
    lora: str = _help("its LoRA adapter: diffusers .safetensors (or folder) or peft folder", "")
    base: str = _help("a fully fine-tuned --pipeline: the pipeline it was fine-tuned from", "")
    members: str = _help("its training pairs: jsonl/csv of image + caption, or ids of --data", "")
    non_members: str = _help("pairs it was not trained on (same format, same distribution)", "")
    data: str = _help("YAML (class_path, init_args) of the source for the shadows' data", "")
    query_fraction: float = _help("without --data: share of each list the target is tested on", 0.5)
    num_shadows: int = _help("shadows to fine-tune like the target (done ones are reused)", 2)
    public_size: int | None = _help("samples of the rest kept for the attacker's encoder", None)
    shadow_config: str = _help("shadows' train.py config (default diffusion/lora|pretrained)", "")
    shadow_args: str = _help("more train.py arguments for the shadows, as one string", "")
    encoder_config: str = _help("encoder config without --encoder", "configs/encoder/tiny.yaml")
    verbose: bool = _help("show every message of Lightning, W&B and the model libraries", False)


def split_names(values: Any) -> list[str]:
    """`['all']`, `['pixel', 'semantic']`, `['[pixel, semantic]']` or `'a,b'` -> a list."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    names = []
    for value in values:
        text = str(value).strip().strip("[]")
        names += [part.strip().strip("'\"") for part in text.split(",") if part.strip()]
    return names


def attack_parser() -> Any:
    """The `attack.py` argument parser, one flag per `AttackOptions` field (also `--a-b`)."""
    from jsonargparse import ActionConfigFile

    parser = argument_parser(prog="attack.py", description="Membership inference on a target.")
    parser.add_argument("--config", action=ActionConfigFile)
    hints = typing.get_type_hints(AttackOptions)
    for f in dataclasses.fields(AttackOptions):
        flags = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        kind, extra = hints[f.name], {}
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (typing.Union, types.UnionType) and list in map(
            typing.get_origin, args
        ):
            kind = next(a for a in args if typing.get_origin(a) is list)
        if typing.get_origin(kind) is list:
            extra = {"nargs": "*", "type": typing.get_args(kind)[0]}
        elif kind is bool:  # `--verbose` alone, or `--progress false`
            extra = {"type": bool, "nargs": "?", "const": True}
        else:
            extra = {"type": kind}
        required = f.default is dataclasses.MISSING
        default = None if required else f.default
        default = list(default) if isinstance(default, tuple) else default
        parser.add_argument(
            *flags, help=f.metadata["help"], required=required, default=default, **extra
        )
    return parser


def options_from(namespace: Any) -> AttackOptions:
    """`AttackOptions` of a parsed namespace (names split, `--config` dropped)."""
    values = {f.name: namespace[f.name] for f in dataclasses.fields(AttackOptions)}
    values["attacks"] = split_names(values["attacks"])
    values["signals"] = split_names(values["signals"])
    return AttackOptions(**values)


def attack_argv(options: AttackOptions) -> list[str]:
    """The `attack.py` flags of `options`, fields at their default left out (the inverse of
    `options_from(attack_parser().parse_args(...))`), for running it as its own process."""
    argv: list[str] = []
    for f in dataclasses.fields(AttackOptions):
        value, default = getattr(options, f.name), f.default
        if isinstance(value, (list, tuple)):
            if isinstance(default, (list, tuple)) and list(value) == list(default):
                continue
            argv += [f"--{f.name}", *map(str, value)]  # none at all: an empty list
        elif value != default and value is not None:
            text = str(value).lower() if isinstance(value, bool) else str(value)
            argv.append(f"--{f.name}={text}")  # `=`: a value may start with "-"
    return argv


def resolve_signals(
    asked: list[str], card: RunCard, layout: ExperimentLayout, captioner: str = ""
) -> list[str]:
    """The gray-box signals to compute: `all`, `auto` (reuse a finished query's of the same
    caption mode) or names."""
    if "auto" in asked:
        done = read_complete(layout.queries(card.run_name, captioner))
        if done is None:
            return signals_for(card.family)
        return [s for s in done.get("signals", "").split(",") if s]
    if "all" in asked:
        return signals_for(card.family)
    return list(asked)


def _target_card(options: AttackOptions) -> tuple[RunCard, ExperimentLayout]:
    if not options.ckpt:
        raise CheckpointError("give --ckpt <target checkpoint>, or --pipeline with --members")
    card = read_card(options.ckpt)
    if card.family not in FAMILIES:
        raise CheckpointError(f"{options.ckpt} is a {card.family} checkpoint, not a target model")
    layout = ExperimentLayout(options.experiment or card.experiment)
    if options.experiment and Path(options.experiment).resolve() != Path(card.experiment).resolve():
        raise CheckpointError(
            f"{options.ckpt} belongs to experiment {card.experiment}, not {options.experiment}"
        )
    return card, layout


def _shadow_checkpoints(options: AttackOptions, card: RunCard, layout: ExperimentLayout) -> list:
    shadows = [last_checkpoint(r) for r in layout.finished_runs(card.family, "shadow")]
    if not shadows and options.setting == "shadow":
        others = sorted(p.name for p in layout.root.glob("*-shadow-[0-9][0-9][0-9]"))
        hint = f" (found shadows of other families: {others})" if others else ""
        raise AttackError(
            f"no trained {card.family} shadow models in {layout.root}{hint}: train them with "
            f"`python train.py fit --config <config> --data.model_index K` for K = 1, 2, ..."
        )
    problems = ATTACKS.check([a for a in options.attacks if a != "all"])
    if problems:
        raise AttackError(problems[0])
    return shadows


def _calibration(layout: ExperimentLayout, shadows: list, tables: list, query: dict) -> list:
    """Each shadow's query on the target's samples, for LiRA: its own table where its row of
    the splits holds every target sample already (shadow_pool auxiliary+queries), else a query
    of row 0 (`queries/<shadow>/row-000/`). The same on every rank (read from splits.json)."""
    from lightning_mia.data.splits import load_splits

    splits = load_splits(layout.splits)
    target = set(splits.row(0).queries)
    out = []
    for ckpt, own in zip(shadows, tables):
        index = int(Path(ckpt).parents[1].name.rsplit("-", 1)[1])  # <family>-shadow-<index>
        covered = target <= set(splits.row(index).queries)
        out.append(own if covered else run_query(str(ckpt), row=0, **query))
    return out


@dataclass(frozen=True)
class AttackOutcome:
    """A finished attack run: the report and where its files are."""

    report: AttackReport
    folder: Path  # report.json, report.md, roc.png
    layout: ExperimentLayout
    shown: bool = False  # its table is on the terminal already (run as its own process)


def run_attack(options: AttackOptions) -> AttackOutcome | None:
    """Query the target and shadows where needed, train and evaluate the attacks and write
    the report (rank 0); None on the other ranks of a multi-device query."""
    configure_terminal(options.verbose)
    if options.pipeline:  # splits, target checkpoint and shadows of a model trained elsewhere
        options = prepare_external(options)
    card, layout = _target_card(options)
    shadows = _shadow_checkpoints(options, card, layout)
    if options.captioner:  # not a captioner, or one of another experiment: before any file
        check_captioner(options.captioner, card.splits_hash)
    logger = make_logger(
        str(layout.root),
        name="attack",
        job_type="attack",
        group=layout.name,
        config={"attack": dataclasses.asdict(options)},
    )
    query = dict(
        num_images=options.num_images,
        seed=options.seed,
        encoder=options.encoder,
        captioner=options.captioner,
        signals=resolve_signals(options.signals, card, layout, options.captioner),
        signal_timesteps=options.signal_timesteps,
        accelerator=options.accelerator,
        devices=options.devices,
        strategy=options.strategy,
        num_nodes=options.num_nodes,
        progress=options.progress,
        logger=logger,
    )
    target = run_query(options.ckpt, **query)  # every rank queries its share of each model
    shadow_tables = [run_query(str(c), **query) for c in shadows]
    calibrate = options.calibrate and options.setting == "shadow"
    calibration = _calibration(layout, shadows, shadow_tables, query) if calibrate else []
    leave_process_group()  # the rest runs on rank 0 alone
    if target is None:  # not global rank zero: rank 0 trains the attacks and reports
        return None
    attacks = ["all"] if "all" in options.attacks else list(options.attacks)
    steps = card.train_steps_per_image or None  # 0: not known (an external target)
    facts = TargetFacts(card.run_name, steps, dict(card.augmentation))
    context = AttackContext.from_tables(target, shadow_tables, options.seed, facts)
    report = run_attacks(
        layout,
        target,
        shadow_tables,
        attacks=attacks,
        setting=options.setting,
        known_fraction=options.known_fraction,
        seed=options.seed,
        max_epochs=options.max_epochs,
        logger=logger,
        context=context,
        calibration=calibration,
        progress=options.progress and options.verbose,  # short loops: bars only when verbose
    )
    if options.captioner:
        report.captions, report.captioner = "captioner", captioner_facts(options.captioner)
    annotate_report(report, card, layout, options.encoder, options.captioner)  # provenance
    folder = layout.report_dir(options.setting, options.captioner)
    log_report(logger, report, write_report(folder, report))
    return AttackOutcome(report, folder, layout)
