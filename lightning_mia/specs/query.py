"""What a query is (`QuerySpec`) and what its shards record (`QueryRecord`).

    spec = QuerySpec(num_images=4, signals=("loss", "pia"))          # --query.num_images 4 ...
    record = QueryRecord(run_name="diffusion-target-000", spec=spec.portable(layout.root), ...)
    write_shard(path, ..., record)        # one JSON document in the shard's metadata
    QueryTable.record.spec == other.record.spec   # target and shadows queried alike?

A `QuerySpec` is everything that decides the features of a query: N images per caption, the
seed, the captions the model is queried with (`captions`: the ground truth, an attacker's
captioner, or one of the two controls: one fixed caption for every sample, captions swapped
among the samples), the attacker's encoder, the feature groups and the gray-box signals with
their options. It is frozen and compared with `==`. `QueryModule`, `run_query`, the attack
command (`--query.*`) and experiment configs (`query:`) take it as one nested group.

Paths in a spec that travels with the shards are relative to the experiment folder when they
lie inside it (`portable`), so a copied or moved experiment reuses its queries; `resolved`
turns them back into paths to open.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from lightning_mia.errors import UserError
from lightning_mia.specs.signals import SignalOptions, signal_preset

CaptionMode = Literal["ground-truth", "captioner", "fixed-caption", "swapped-caption"]
CAPTION_MODES: tuple[str, ...] = ("ground-truth", "captioner", "fixed-caption", "swapped-caption")
CONTROL_MODES = ("fixed-caption", "swapped-caption")  # controls: how much survives them
RECORD_KEY = "lightning_mia.query"  # the shard metadata key holding the QueryRecord
ENCODER_FOLDER = "encoder"  # the experiment's own attacker encoder (`encoder: ""`)


class QuerySpecError(UserError):
    """A query specification that cannot be run (bad value, missing captioner...)."""


@dataclass(frozen=True)
class QuerySpec:
    """What a query is: every setting that changes its features.

    Args:
        num_images: images generated per caption (N, the black-box queries per sample).
        seed: base seed; sample i is generated (and noised) with seeds of (seed, sample_id).
        captions: what the model is queried with: ground-truth, captioner (the attacker's
            captioner's caption of the image), fixed-caption (`fixed_caption` for every sample)
            or swapped-caption (another sample's caption, a seeded derangement); every signal,
            black-box and gray-box, reads these captions.
        captioner: folder of the attacker's BLIP captioner (given alone, it implies
            captions: captioner).
        fixed_caption: the one caption of the fixed-caption control.
        encoder: folder of the attacker's image-text encoder ("" = the experiment's encoder/).
        feature_groups: black-box feature groups to compute (None = every group an attack
            that reads generated images or the query alone needs).
        signals: gray-box signals computed beside the features (`all`: every signal of the
            model's family; the attack command also takes `auto`).
        signal_options: options of the gray-box signals.
        signal_preset: a named set of signal options (`specs.signals.SIGNAL_PRESETS`, e.g.
            reference-sd: the authors' Stable Diffusion settings); it replaces `signal_options`.
    """

    num_images: int = 4
    seed: int = 0
    captions: CaptionMode = "ground-truth"
    captioner: str = ""
    fixed_caption: str = "an image"
    encoder: str = ""
    feature_groups: tuple[str, ...] | None = None
    signals: tuple[str, ...] = ()
    signal_options: SignalOptions = field(default_factory=SignalOptions)
    signal_preset: str = ""

    def __post_init__(self) -> None:
        # one order, whatever order a registry or a user named them in (compared with ==)
        object.__setattr__(self, "signals", tuple(sorted(set(self.signals))))
        if self.signal_preset:  # UnknownNameError (a UserError) lists the known presets
            preset = signal_preset(self.signal_preset)
            if self.signal_options not in (SignalOptions(), preset):  # both given: which wins?
                raise QuerySpecError(
                    f"query: signal_preset {self.signal_preset!r} sets every signal option; "
                    "give either the preset or signal_options, not both"
                )
            object.__setattr__(self, "signal_options", preset)
        if self.captioner and self.captions == "ground-truth":  # a captioner names the mode
            object.__setattr__(self, "captions", "captioner")
        problems = self.problems()
        if problems:
            raise QuerySpecError("query: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Every problem with the values, one line each."""
        problems = []
        if self.num_images < 1:
            problems.append(f"num_images must be >= 1, got {self.num_images}")
        if self.captions not in CAPTION_MODES:
            problems.append(f"captions {self.captions!r} unknown; known: {list(CAPTION_MODES)}")
        if self.captions == "captioner" and not self.captioner:
            problems.append("captions: captioner needs a captioner folder (query.captioner)")
        if self.captioner and self.captions != "captioner":
            problems.append(f"a captioner is given but captions is {self.captions!r}")
        if self.captions == "fixed-caption" and not self.fixed_caption.strip():
            problems.append("fixed_caption is empty")
        return problems

    @property
    def tag(self) -> str:
        """The suffix of this caption mode's query and report folders (`caption_tag`)."""
        return caption_tag(self.captions, self.captioner)

    def differences(self, other: QuerySpec) -> list[str]:
        """`field: mine vs theirs` for each field where `other` differs (signal options by
        option)."""
        mine, theirs = self.to_dict(), other.to_dict()
        a, b = mine.pop("signal_options"), theirs.pop("signal_options")
        out = [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in mine if mine[k] != theirs[k]]
        return out + [f"signal_options.{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k]]

    def with_updates(self, **changes: Any) -> QuerySpec:
        """A copy with `changes` (validated again)."""
        return replace(self, **changes)

    def portable(self, root: str | os.PathLike, needs_encoder: bool) -> QuerySpec:
        """This spec as shards record it: `encoder` resolved ("" = the experiment's encoder/,
        "" again when no feature group needs one) and both folders relative to `root` when
        they lie inside it."""
        encoder = (self.encoder or str(Path(root) / ENCODER_FOLDER)) if needs_encoder else ""
        return replace(
            self,
            encoder=relative_to(encoder, root),
            captioner=relative_to(self.captioner, root),
        )

    def resolved(self, root: str | os.PathLike) -> QuerySpec:
        """This spec with its relative folders joined to `root` (the folders to open)."""
        return replace(
            self,
            encoder=joined(self.encoder, root),
            captioner=joined(self.captioner, root),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuerySpec:
        values = dict(data)
        options = values.pop("signal_options", None) or {}
        for key in ("feature_groups", "signals"):
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        return cls(**values, signal_options=signal_options_from(options))


def caption_tag(captions: str, captioner: str = "") -> str:
    """The suffix of a caption mode's query and report folders: none for the ground truth,
    `@<captioner folder name>`, `@fixed-caption` or `@swapped-caption`."""
    if captions == "ground-truth":
        return ""
    if captions == "captioner":
        return f"@{Path(captioner).name}"
    return f"@{captions}"


def signal_options_from(data: dict[str, Any]) -> SignalOptions:
    """`SignalOptions` of a JSON mapping (its lists as tuples)."""
    known = {f.name for f in fields(SignalOptions)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
    return SignalOptions(**values)


def relative_to(path: str, root: str | os.PathLike) -> str:
    """A folder given by the user (absolute, or relative to the working folder) as a portable
    spec names it: relative to `root` when it lies inside it, else absolute ("" stays "")."""
    if not path:
        return path
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(Path(path).resolve())


def joined(path: str, root: str | os.PathLike) -> str:
    """A folder a portable spec names, as a path to open ("" stays "")."""
    if not path or Path(path).is_absolute():
        return path
    return str(Path(root) / path)


@dataclass(frozen=True)
class QueryRecord:
    """What every shard (and COMPLETE.json) of one query records: the queried model, the rows
    it was queried on, and the portable `QuerySpec`.

    Attributes:
        splits_hash: hash of the splits.json the model was trained on.
        run_name: the queried model (`diffusion-shadow-001`).
        family: its family; preset: its preset; model_index: its row of splits.json.
        train_steps_per_image: how long it trained (from its run card).
        row: the row whose samples were queried (None = the model's own).
        spec: the query, portable (folders relative to the experiment).
        signal_queries: model passes per sample of each gray-box signal.
        sampler: the family's `sampler_version` ("" = its first): its generated images.
    """

    splits_hash: str = ""
    run_name: str = ""
    family: str = ""
    preset: str = ""
    model_index: int = 0
    train_steps_per_image: float = 0.0
    row: int | None = None
    spec: QuerySpec = field(default_factory=QuerySpec)
    signal_queries: dict[str, int] = field(default_factory=dict)
    sampler: str = ""

    def to_metadata(self) -> dict[str, str]:
        """The safetensors metadata of a shard: this record as one JSON document."""
        return {RECORD_KEY: json.dumps(self.to_dict(), sort_keys=True)}

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], where: str) -> QueryRecord:
        """The record of a shard's metadata; QuerySpecError naming `where` if it has none."""
        text = metadata.get(RECORD_KEY)
        if not text:
            raise QuerySpecError(
                f"{where}: no query record (written by an older lightning_mia?): delete the "
                "query folder and query again"
            )
        return cls.from_dict(json.loads(text))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QueryRecord:
        values = {k: v for k, v in data.items() if k in {f.name for f in fields(cls)}}
        values["spec"] = QuerySpec.from_dict(values.get("spec") or {})
        return cls(**values)
