"""The attack report's data model: `AttackResult`, `AttackReport` and their JSON.

`attack.render` turns a report into report.md, roc.png and the terminal table and writes the
files; `lightning_mia.reporting` logs it to W&B.

report.json (keys sorted; `null` where unknown)::

    {
      "setting": "shadow" | "partial",      "known_fraction": null | 0.5,
      "family": "diffusion",                "num_images": 4,       # N images per caption
      "num_shadows": 2,                     "seeds": {"attack": 0, "query": 0, ...},
      "splits_hash": "ab12...",
      "target": {"run_name": "diffusion-target-000", "train_steps_per_image": 300.0,
                 "augmentation": {...}},
      "test_samples": {"members": 64, "non_members": 64},     # rows the metrics are read on
      "attacks": {
        "<name>": {
          "access": "black-box" | "gray-box" | "none",
          "queries_per_sample": 4 | null,    "seconds_per_sample": 0.8 | null,
          "features": ["pixel/mse_mean", ...],
          "details": {...},                  # attack-specific (threshold baseline: its rule)
          "metrics": {"accuracy" | "auc" | "tpr@1%fpr" | "tpr@0.1%fpr":
                      {"value": 0.93 | null, "low": 0.90, "high": 0.95, "resolvable": true}}
        }
      },
      "baselines": {"threshold": {...same shape...}, "blind": {...same shape...}},
      "created": "2026-01-01T12:00:00+00:00",
      "notes": ["...", ...]
    }

`value` is null and `resolvable` false for a TPR@FPR with fewer than 1/budget non-members;
`low`/`high` are the bootstrap 95% percentile interval.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_mia.attack.spec import QueryCosts
from lightning_mia.metrics import Metric

REPORT_JSON, REPORT_MD, ROC_PNG = "report.json", "report.md", "roc.png"


@dataclass(frozen=True)
class TargetFacts:
    """What the report says of the target model (from its run card)."""

    run_name: str = ""
    train_steps_per_image: float | None = None
    augmentation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_name": self.run_name,
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
        """Everything the target's query table records (its shard metadata and timing files);
        `target_facts` (from the run card) replaces what the shards only round."""
        meta = target.metadata
        steps = meta.get("train_steps_per_image")
        facts = target_facts or TargetFacts(
            meta.get("run_name", ""), float(steps) if steps else None
        )
        seeds = {"query": int(meta["seed"])} if meta.get("seed") else {}
        return cls(
            family=meta.get("family", ""),
            num_shadows=len(shadows),
            seeds={**seeds, "attack": seed},
            splits_hash=meta.get("splits_hash", ""),
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "access": self.access,
            "queries_per_sample": self.queries_per_sample,
            "seconds_per_sample": self.seconds_per_sample,
            "features": list(self.features),
            "details": dict(self.details),
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> AttackResult:
        metrics = {k: Metric.from_dict(m) for k, m in d.get("metrics", {}).items()}
        return cls(
            name, d["access"], d.get("queries_per_sample"), metrics, list(d.get("features", [])),
            d.get("seconds_per_sample"), dict(d.get("details", {})),
        )  # fmt: skip


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
    notes: list[str] = field(default_factory=list)
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat()
    )

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


def read_report(folder: str | os.PathLike) -> AttackReport:
    """The report.json of an attack folder (scores are not stored there)."""
    return AttackReport.from_dict(json.loads((Path(folder) / REPORT_JSON).read_text("utf-8")))
