"""The attack report's data model: `AttackResult`, `AttackReport` and their JSON.

`attack.render` turns a report into report.md, roc.png and the terminal table and writes the
files; `lightning_mia.reporting` logs it to W&B.

report.json (keys sorted; `null` where unknown)::

    {
      "setting": "shadow" | "partial",      "known_fraction": null | 0.5,
      "family": "diffusion",                "num_images": 4,       # N images per caption
      "num_shadows": 2,                     "seeds": {"attack": 0, "query": 0, ...},
      "splits_hash": "ab12...",
      "captions": "ground-truth" | "captioner" | "fixed-caption" | "swapped-caption",  # what
                                      # every query (and gray-box signal) read
      "captioner": {} | {"folder": "/abs/runs/demo/captioner", "train_steps": 2000,
                         "quality": {"bleu": 0.7, "shapes_colours": 0.8, ...}},  # folder
                                      # alone for a pretrained one
      "target": {"run_name": "diffusion-target-000", "model_index": 0,
                 "train_steps_per_image": 300.0, "augmentation": {...}},
      "test_samples": {"members": 64, "non_members": 64},     # rows the metrics are read on
      "accuracy_is_balanced": false,         # true: unequal classes, balanced accuracy
      "attacks": {
        "<name>": {
          "access": "black-box" | "gray-box" | "none",
          "queries_per_sample": 4 | null,    "seconds_per_sample": 0.8 | null,
          "features": ["pixel/mse_mean", ...],
          "details": {...},                  # attack-specific (threshold baseline: its rule)
          "flags": [] | ["ranks the target backwards: shadow/target mismatch"],
          "metrics": {"accuracy" | "auc": {"value": 0.93 | null, "low": 0.90, "high": 0.95,
                                           "resolvable": true},
                      "tpr@1%fpr" | "tpr@0.1%fpr": {..., "false_positives": 1}}
        }
      },
      "baselines": {"threshold": {...same shape...}, "blind": {...same shape...}},
      "created": "2026-01-01T12:00:00+00:00",
      "notes": ["...", ...]
    }

`value` is null and `resolvable` false for a TPR@FPR with fewer than 1/budget non-members;
`low`/`high` are the bootstrap 95% percentile interval; `false_positives` is the number of
non-members the TPR@FPR's threshold admits. The per-sample test scores are in scores.csv
beside report.json (`attack.scores`).

`blind` is a diagnostic of the benchmark, not an attack: cross-validated on the target's own
rows (`details.diagnostic`), it is never flagged as ranking backwards.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_mia.metrics import Metric, evaluate
from lightning_mia.specs.attacks import AttackSpec, QueryCosts

REPORT_JSON, REPORT_MD, ROC_PNG = "report.json", "report.md", "roc.png"
BACKWARDS = "ranks the target backwards: shadow/target mismatch"


@dataclass(frozen=True)
class TargetFacts:
    """What the report says of the target model (from its run card)."""

    run_name: str = ""
    train_steps_per_image: float | None = None
    augmentation: dict[str, Any] = field(default_factory=dict)
    model_index: int = 0  # the target's row of splits.json (0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
            "model_index": self.model_index,
            "train_steps_per_image": self.train_steps_per_image,
            "augmentation": dict(self.augmentation),
        }


@dataclass(frozen=True)
class AttackContext:
    """What an attack run knows besides the query tables' rows: the report's facts and costs."""

    family: str
    num_shadows: int
    seeds: dict[str, int]  # {"query": ..., "attack": ...}
    splits_hash: str
    target: TargetFacts
    costs: QueryCosts

    @classmethod
    def from_tables(
        cls,
        target: Any,
        shadows: list[Any],
        seed: int,
        target_facts: TargetFacts | None = None,
    ) -> AttackContext:
        """Everything the target's query table records (its query record and timing files);
        `target_facts` (from the run card) replaces what the shards only round."""
        record = target.record
        steps = record.train_steps_per_image
        facts = target_facts or TargetFacts(
            record.run_name, float(steps) if steps else None, model_index=int(target.model_index)
        )
        return cls(
            family=record.family,
            num_shadows=len(shadows),
            seeds={"query": record.spec.seed, "attack": seed},
            splits_hash=record.splits_hash,
            target=facts,
            costs=target.costs(),
        )


@dataclass
class AttackResult:
    """One attack's (or baseline's) figures; `scores` etc. are kept for plots, not in JSON."""

    name: str
    access: str
    queries_per_sample: int | None
    metrics: dict[str, Metric]
    features: list[str]
    seconds_per_sample: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    scores: torch.Tensor | None = None  # (S,) test scores, higher = member
    labels: torch.Tensor | None = None  # (S,) bool
    sample_id: torch.Tensor | None = None  # (S,) int64
    flags: list[str] = field(default_factory=list)  # warnings about the figures (BACKWARDS)

    @classmethod
    def from_scores(
        cls,
        spec: AttackSpec,
        scores: torch.Tensor,
        labels: torch.Tensor,
        ids: torch.Tensor,
        features: list[str],
        threshold: float,
        costs: QueryCosts,
        seed: int,
        n_boot: int,
        measured: bool = True,
        details: dict[str, Any] | None = None,
    ) -> AttackResult:
        """The result of test `scores` (S,) with `labels` (S,): every metric with its bootstrap
        interval, accuracy at `threshold`. `measured=False` for results derived from another
        attack's features (threshold baseline, LiRA): no seconds of their own are measured."""
        metrics = evaluate(scores, labels, threshold, n_boot=n_boot, seed=seed)
        return cls(
            spec.name,
            spec.access,
            spec.queries(costs),
            metrics,
            features,
            spec.seconds(costs) if measured else None,
            dict(details or {}),
            scores=scores,
            labels=labels.bool(),
            sample_id=ids,
        )

    @property
    def is_diagnostic(self) -> bool:
        """A figure about the benchmark, not an attack (the blind baseline's target CV)."""
        return bool(self.details.get("diagnostic"))

    def ranks_backwards(self) -> bool:
        """The AUC's whole interval lies below 0.5: the attack orders the target's samples the
        wrong way round (it learned on rows unlike the target's)."""
        auc = self.metrics.get("auc")
        return (
            not self.is_diagnostic and auc is not None and auc.high is not None and auc.high < 0.5
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "access": self.access,
            "queries_per_sample": self.queries_per_sample,
            "seconds_per_sample": self.seconds_per_sample,
            "features": list(self.features),
            "details": dict(self.details),
            "flags": list(self.flags),
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> AttackResult:
        metrics = {k: Metric.from_dict(m) for k, m in d.get("metrics", {}).items()}
        return cls(
            name,
            d["access"],
            d.get("queries_per_sample"),
            metrics,
            list(d.get("features", [])),
            d.get("seconds_per_sample"),
            dict(d.get("details", {})),
            flags=list(d.get("flags", [])),
        )


@dataclass
class AttackReport:
    """Everything one attack run established (see the module docstring for the JSON)."""

    setting: str
    family: str
    num_images: int | None
    num_shadows: int
    seeds: dict[str, Any]
    splits_hash: str
    target: dict[str, Any]
    attacks: dict[str, AttackResult]
    baselines: dict[str, AttackResult]
    known_fraction: float | None = None
    test_samples: dict[str, int] = field(default_factory=dict)
    captions: str = "ground-truth"  # the query's caption mode (`specs.query.CAPTION_MODES`)
    captioner: dict[str, Any] = field(default_factory=dict)  # its folder, training, quality
    notes: list[str] = field(default_factory=list)
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat()
    )

    @property
    def accuracy_is_balanced(self) -> bool:
        """Unequal members and non-members in the test rows: `accuracy` is balanced accuracy."""
        t = self.test_samples
        return bool(t) and t.get("members") != t.get("non_members")

    def results(self) -> Iterator[tuple[str, AttackResult]]:
        """("attack" | "baseline", result) for every attack, then every baseline."""
        yield from (("attack", r) for r in self.attacks.values())
        yield from (("baseline", r) for r in self.baselines.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "known_fraction": self.known_fraction,
            "family": self.family,
            "num_images": self.num_images,
            "num_shadows": self.num_shadows,
            "seeds": dict(self.seeds),
            "splits_hash": self.splits_hash,
            "target": dict(self.target),
            "test_samples": dict(self.test_samples),
            "captions": self.captions,
            "captioner": dict(self.captioner),
            "accuracy_is_balanced": self.accuracy_is_balanced,
            "attacks": {n: r.to_dict() for n, r in self.attacks.items()},
            "baselines": {n: r.to_dict() for n, r in self.baselines.items()},
            "created": self.created,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttackReport:
        parts = {
            k: {n: AttackResult.from_dict(n, r) for n, r in d[k].items()}
            for k in ("attacks", "baselines")
        }
        simple = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in parts}
        return cls(**simple, **parts)


def flag_backwards(results: Sequence[AttackResult]) -> list[str]:
    """Flag every result whose AUC interval lies wholly below 0.5; one note each."""
    notes = []
    for r in results:
        if r.ranks_backwards() and BACKWARDS not in r.flags:
            r.flags.append(BACKWARDS)
            auc = r.metrics["auc"]
            notes.append(
                f"{r.name} {BACKWARDS}: AUC {auc.value:.3f} [{auc.low:.3f}, {auc.high:.3f}] lies "
                "wholly below 0.5, so what it learned on the training rows orders the target's "
                "samples the wrong way round (the training and target rows differ, e.g. in what "
                "the shared components saw); do not read its figures as leakage"
            )
    return notes


def read_report(folder: str | os.PathLike) -> AttackReport:
    """The report.json of an attack folder (scores are not stored there)."""
    return AttackReport.from_dict(json.loads((Path(folder) / REPORT_JSON).read_text("utf-8")))
