"""What `attack.py` takes: `AttackOptions`, in typed groups, and its parser.

    python attack.py --ckpt runs/demo/diffusion-target-000/checkpoints/last.ckpt
    python attack.py --ckpt ... --attack.attacks all --query.num_images 8
    python attack.py --ckpt ... --attack.setting partial --attack.known_fraction 0.5
    python attack.py --ckpt ... --query.captions captioner --query.captioner runs/demo/captioner
    python attack.py --ckpt ... --query.signal_options.secmi_t 150 --devices.devices 2
    python attack.py --ckpt ... --signal-preset reference-sd     # the authors' SD settings
    python attack.py --ckpt ... --controls                       # fixed and swapped captions
    python attack.py --ckpt ... --dataset-inference --group-by user --audit.alpha 0.05
    python attack.py --config configs/attack/default.yaml --ckpt ...
    python attack.py --external.pipeline /models/sd-v1-5 --external.lora my_lora/ \
        --external.members members.jsonl --external.non_members non.jsonl --experiment runs/audit

The top-level fields name the target (`ckpt`, `experiment`), what is reported beside the
per-sample attacks (`controls`, `dataset_inference`, `group_by`) and the terminal (`progress`,
`verbose`); the groups are what the attack stage does (`attack`), what each query is (`query`,
the `QuerySpec` every model is queried with), where queries run (`devices`), how the set-level
audit tests (`audit`) and a model trained elsewhere (`external`). jsonargparse builds the
parser from these dataclasses, so a YAML config holds the same nested keys. List options also
take bare words (`--attack.attacks pixel semantic`, `--query.signals all`), flags stand alone
(`--verbose`) and `--signal-preset NAME` is `--query.signal_preset NAME`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_mia.query.run import Devices
from lightning_mia.setlevel import AuditOptions
from lightning_mia.specs.attacks import AttackError
from lightning_mia.specs.query import QuerySpec
from lightning_mia.terminal import argument_parser, normalized_argv

Setting = Literal["shadow", "partial"]
SETTINGS = ("shadow", "partial")
PAPER = "paper"  # in `attacks`: Wu et al.'s four (`specs.attacks.paper_attacks`)
ALIASES = {"signal_preset": "query.signal_preset"}  # `--signal-preset reference-sd`


@dataclass(frozen=True)
class AttackSettings:
    """What the attack stage does with the query tables.

    Args:
        attacks: attacks to run: names, `paper` (Wu et al.'s four) or `all` (every attack
            whose features the queries hold); the threshold and blind baselines always run.
        setting: shadow (train on the shadows, test on the target) or partial (train on a
            known part of the target).
        known_fraction: partial setting: share of the target's rows the attacker knows.
        max_epochs: attack training cap (early stopping on held-out training rows ends it).
        calibrate: shadow setting: also query each shadow on the target's samples, for
            offline LiRA of every attack.
        seed: seed of the attack data splits, attack initialisation and bootstrap.
    """

    attacks: tuple[str, ...] = (PAPER,)
    setting: Setting = "shadow"
    known_fraction: float = 0.5
    max_epochs: int = 200
    calibrate: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.setting not in SETTINGS:
            problems.append(f"setting {self.setting!r} unknown; known: {list(SETTINGS)}")
        if not 0.0 < self.known_fraction < 1.0:
            problems.append(f"known_fraction must be in (0, 1), got {self.known_fraction}")
        if self.max_epochs < 1:
            problems.append(f"max_epochs must be >= 1, got {self.max_epochs}")
        if problems:
            raise AttackError("attack: " + "; ".join(problems))


@dataclass(frozen=True)
class ExternalTarget:
    """A model trained elsewhere: a diffusers pipeline folder and its member lists.

    Args:
        pipeline: StableDiffusion(3)Pipeline folder of the target (with `lora`: its base).
        lora: its LoRA adapter: diffusers .safetensors (or folder) or peft folder.
        base: a fully fine-tuned `pipeline`: the pipeline it was fine-tuned from.
        members: its training pairs: jsonl/csv of image + caption, or ids of `data`.
        non_members: pairs it was not trained on (same format, same distribution).
        data: YAML (class_path, init_args) of the source for the shadows' data.
        query_fraction: without `data`: share of each list the target is tested on.
        num_shadows: shadows fine-tuned like the target (finished ones are reused).
        public_size: samples of the rest kept for the attacker's encoder.
        shadow_config: the shadows' train.py config (default: the family's lora or pretrained).
        shadow_args: more train.py arguments for the shadows, as one string.
        encoder_config: the attacker's encoder config when `query.encoder` is not given.
    """

    pipeline: str = ""
    lora: str = ""
    base: str = ""
    members: str = ""
    non_members: str = ""
    data: str = ""
    query_fraction: float = 0.5
    num_shadows: int = 2
    public_size: int | None = None
    shadow_config: str = ""
    shadow_args: str = ""
    encoder_config: str = "configs/encoder/tiny.yaml"


@dataclass(frozen=True)
class AttackOptions:
    """Everything `attack.py` takes.

    Args:
        ckpt: target model checkpoint (its run card names the experiment).
        experiment: experiment folder (default: the checkpoint's).
        attack: what the attack stage does.
        query: what every model is queried with (signals also `auto`: those of a finished
            target query, else all of the family's).
        devices: where the queries run.
        external: a model trained elsewhere (instead of `ckpt`).
        controls: also query the target with one fixed caption for every sample and with
            captions swapped among the samples, and report how much of each attack's AUC
            survives them (the attacks trained on the shadows, scored on those queries).
        dataset_inference: the set-level audit: was the suspect set (the target's members)
            used, against the reference set (its non-members)? A p-value, the smallest set
            size it needs, and a shift guard (`lightning_mia.setlevel`).
        group_by: a column of the data source (user, artist...): one audit per group, with
            Benjamini-Hochberg over the groups.
        audit: how the set-level audit tests (level, aggregation, test, curve).
        progress: show progress bars.
        verbose: show every message of Lightning, W&B and the model libraries.
    """

    ckpt: str = ""
    experiment: str = ""
    attack: AttackSettings = field(default_factory=AttackSettings)
    query: QuerySpec = field(default_factory=lambda: QuerySpec(signals=("auto",)))
    devices: Devices = field(default_factory=Devices)
    external: ExternalTarget = field(default_factory=ExternalTarget)
    controls: bool = False
    dataset_inference: bool = False
    group_by: str = ""
    audit: AuditOptions = field(default_factory=AuditOptions)
    progress: bool = True
    verbose: bool = False


def list_keys(cls: type, prefix: str = "") -> list[str]:
    """The dotted keys of `cls`'s (nested dataclass) fields typed as lists or tuples."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += list_keys(kind, f"{prefix}{f.name}.")
            continue
        kinds = typing.get_args(kind) if typing.get_origin(kind) in UNIONS else (kind,)
        if any(typing.get_origin(k) in (list, tuple) for k in kinds):
            keys.append(prefix + f.name)
    return keys


UNIONS = (typing.Union, types.UnionType)


def flag_keys(cls: type, prefix: str = "") -> list[str]:
    """The dotted keys of `cls`'s boolean fields (they may stand alone: `--verbose`)."""
    keys, hints = [], typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            keys += flag_keys(kind, f"{prefix}{f.name}.")
        elif kind is bool:
            keys.append(prefix + f.name)
    return keys


def attack_parser() -> Any:
    """The `attack.py` parser: `--config` and one flag per field of `AttackOptions`."""
    from jsonargparse import ActionConfigFile

    parser = argument_parser(prog="attack.py", description="Membership inference on a target.")
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_class_arguments(AttackOptions, None)
    return parser


def parse_attack_options(argv: Sequence[str]) -> AttackOptions:
    """`AttackOptions` of an `attack.py` command line (bare-word lists and lone flags too)."""
    parser = attack_parser()
    args = normalized_argv(argv, list_keys(AttackOptions), flag_keys(AttackOptions), ALIASES)
    config = parser.parse_args(args)
    values = parser.instantiate(config)
    return AttackOptions(**{f.name: values[f.name] for f in dataclasses.fields(AttackOptions)})


def dump_attack_options(options: AttackOptions) -> str:
    """`options` as the YAML config `attack.py --config` reads (a stage run as its own
    process is given its options this way)."""
    parser = attack_parser()
    config = parser.parse_object(dataclasses.asdict(options))
    return parser.dump(config, skip_none=False)
