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
      "query": {"num_images": 4, "seed": 0, "captions": ..., "signals": [...],
                "signal_options": {...}, ...},          # the QuerySpec of every query
      "controls": {} | {"fixed-caption": {"<row>": 0.61, ...}, "swapped-caption": {...}},
      "dataset_inference": {} | {...},       # the set-level audit (dataset_inference.json)
      "captioner": {} | {"folder": "/abs/runs/demo/captioner", "train_steps": 2000,
                         "quality": {"bleu": 0.7, "shapes_colours": 0.8, ...}},  # folder
                                      # alone for a pretrained one
      "target": {"run_name": "diffusion-target-000", "model_index": 0,
                 "train_steps_per_image": 300.0, "augmentation": {...}},
      "test_samples": {"members": 64, "non_members": 64},     # rows the metrics are read on
      "accuracy_is_balanced": false,         # true: unequal classes, balanced accuracy
      "attacks": {
        "<row>": {                           # row names: README "## Attacks"
          "attack": "loss",                  # the registered attack the row derives from
          "statistic": "learned" | "reference" | "calibrated" | "baseline" | "diagnostic",
          "access": "black-box" | "gray-box" | "none",
          "queries_per_sample": 4 | null,    "seconds_per_sample": 0.8 | null,
          "features": ["pixel/mse_mean", ...],
          "details": {...},                  # attack-specific (threshold baseline: its rule)
          "flags": [] | ["ranks the target backwards: shadow/target mismatch"],
          "metrics": {"accuracy" | "auc": {"value": 0.93 | null, "low": 0.90, "high": 0.95,
                                           "resolvable": true},
                      "tpr@1%fpr" | "tpr@0.1%fpr": {..., "false_positives": 1}},
          "realised": null | {"budget": 0.01, "threshold": 2.3, "chosen_on": "training rows",
                              "shadow_fpr": 0.008 | null, "fpr": 0.012, "tpr": 0.34,
                              "false_positives": 6, "non_members": 500,
                              "true_positives": 170, "members": 500}
        }
      },
      "baselines": {"threshold": {...same shape...}, "blind": {...same shape...}},
      "created": "2026-01-01T12:00:00+00:00",
      "notes": ["...", ...]
    }

`value` is null and `resolvable` false for a TPR@FPR with fewer than 1/budget non-members;
`low`/`high` are the bootstrap 95% percentile interval; `false_positives` is the number of
non-members the TPR@FPR's threshold admits (read strictly below the budget). `realised` is the
threshold an attacker would deploy for 1% FPR, chosen without target labels (`chosen_on`: the
held-out shadow rows of a learned attack, the shadow rows of a one-score rule, or LiRA's own OUT
Gaussians), and what it gives on the target: its realised FPR and TPR; null where no such
threshold exists (online LiRA, the blind diagnostic). The per-sample test scores are in scores.csv
beside report.json (`attack.scores`).

`blind` is a diagnostic of the benchmark, not an attack: cross-validated on the target's own
rows (`details.diagnostic`), it is never flagged as ranking backwards.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_mia.metrics import Metric, evaluate, rates_at, threshold_at_fpr
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


REALISED_BUDGET = 0.01  # the FPR a deployed threshold is chosen for


@dataclass(frozen=True)
class Realised:
    """A threshold chosen without target labels for an FPR budget, applied to the target."""

    budget: float
    threshold: float
    chosen_on: str  # which rows (or model) chose it
    shadow_fpr: float | None  # its FPR on the rows that chose it (None: chosen by a model)
    fpr: float  # on the target's test rows
    tpr: float
    false_positives: int
    non_members: int
    true_positives: int
    members: int

    @classmethod
    def chosen(
        cls,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        chosen_on: str,
        budget: float = REALISED_BUDGET,
    ) -> Realised:
        """The cut of FPR < `budget` on (scores, labels) `train`, read on `test`."""
        cut = threshold_at_fpr(*train, budget)
        return cls.at(cut, test, chosen_on, rates_at(*train, cut)["fpr"], budget)

    @classmethod
    def at(
        cls,
        threshold: float,
        test: tuple[torch.Tensor, torch.Tensor],
        chosen_on: str,
        shadow_fpr: float | None = None,
        budget: float = REALISED_BUDGET,
    ) -> Realised:
        """A given cut (e.g. a p-value's) read on (scores, labels) `test`."""
        r = rates_at(*test, threshold)
        return cls(budget, float(threshold), chosen_on, shadow_fpr, **r)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threshold"] = d["threshold"] if math.isfinite(d["threshold"]) else None  # JSON: no inf
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Realised | None:
        if not d:
            return None
        t = d.get("threshold")
        return cls(**{**d, "threshold": math.inf if t is None else t})

    def format(self) -> str:
        """`0.012 / 0.340`: realised FPR / TPR on the target."""
        return f"{self.fpr:.3f} / {self.tpr:.3f}"


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
    attack: str = ""  # the registered attack the row derives from ("" = the row's name)
    statistic: str = "learned"  # learned | reference | calibrated | baseline | diagnostic
    realised: Realised | None = None  # the 1%-FPR cut chosen without target labels

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
        *,
        row: str = "",
        statistic: str = "learned",
        realised: Realised | None = None,
    ) -> AttackResult:
        """The result of test `scores` (S,) with `labels` (S,): every metric with its bootstrap
        interval, accuracy at `threshold`. `measured=False` for results derived from another
        attack's features (threshold baseline, LiRA): no seconds of their own are measured.
        `row` names the report row (default: the attack's name)."""
        metrics = evaluate(scores, labels, threshold, n_boot=n_boot, seed=seed)
        return cls(
            row or spec.name,
            spec.access,
            spec.queries(costs),
            metrics,
            features,
            spec.seconds(costs) if measured else None,
            dict(details or {}),
            scores=scores,
            labels=labels.bool(),
            sample_id=ids,
            attack=spec.name,
            statistic=statistic,
            realised=realised,
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
            "attack": self.attack or self.name,
            "statistic": self.statistic,
            "realised": self.realised.to_dict() if self.realised else None,
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
            attack=d.get("attack", name),
            statistic=d.get("statistic", "learned"),
            realised=Realised.from_dict(d.get("realised")),
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
    query: dict[str, Any] = field(default_factory=dict)  # the QuerySpec every model was queried
    # with (portable: folders relative to the experiment)
    controls: dict[str, dict[str, float | None]] = field(default_factory=dict)  # control mode
    # -> row -> AUC of the attacks trained on the shadows, scored on the target's control query
    dataset_inference: dict[str, Any] = field(default_factory=dict)  # the set-level audit
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
            "query": dict(self.query),
            "controls": {m: dict(aucs) for m, aucs in self.controls.items()},
            "dataset_inference": dict(self.dataset_inference),
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
