"""What a set-level audit found, as `attack/dataset_inference.json` keeps it.

    result.to_dict() / DatasetInferenceResult.from_dict(d)    # JSON round trip, lossless
    result.statement                                          # the finding in one sentence

Decisions: `detected` (the suspect set scores higher than the reference set at level alpha and
the shift guard finds no difference in the query data alone), `confounded` (it scores higher,
but the query images and captions alone already tell the two sets apart, so the difference may
be distribution shift rather than training), `not detected` (no evidence at level alpha, which
is not evidence that the set was unused).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lightning_mia.setlevel.stats import Outcome

FORMAT_VERSION = 1
TARGET_P = 0.01  # the smallest set size is the one whose median p-value falls below this
DETECTED, CONFOUNDED, NOT_DETECTED = "detected", "confounded", "not detected"
ASSUMPTIONS = (
    "Samples are independent: no sample's features depend on another's (near-duplicates "
    "within or across the sets break this; exact duplicates across the sets are refused).",
    "The reference set was not used to train the model and comes from the same distribution "
    "as the suspect set (same source, same collection process); the shift guard tests the "
    "part of this that the query images and captions alone can show.",
    "The aggregation was learned without the samples it tests (on shadow models' rows and/or "
    "a held-out part of the two sets), so under 'not used' the tested scores of both sets "
    "are exchangeable and the p-value is valid.",
)

CALIBRATION_ASSUMPTION = (
    "Each tested sample's difficulty comes from shadow models queried on it the same way "
    "whether it is in the suspect or the reference set, and whether a shadow trained on a "
    "sample does not depend on which set the sample is in, so removing it keeps the two sets "
    "exchangeable when the suspect set was not used."
)


def _num(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class SizeCurve:
    """Median p-value (and quartiles) over random subsets of k suspect samples."""

    sizes: tuple[int, ...]  # k, suspect samples per subset
    reference_sizes: tuple[int, ...]  # reference samples drawn with each k
    median: tuple[float, ...]
    low: tuple[float, ...]  # first quartile
    high: tuple[float, ...]  # third quartile
    repeats: int  # random subsets per size
    smallest_size: int | None  # smallest k from which the median stays below TARGET_P
    resolution: float = 0.0  # smallest p its permutation tests can give (0: none was run)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "target_p": TARGET_P}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SizeCurve:
        keys = ("sizes", "reference_sizes", "median", "low", "high")
        lists = {k: tuple(d[k]) for k in keys}
        return cls(
            **lists,
            repeats=d["repeats"],
            smallest_size=d["smallest_size"],
            resolution=d["resolution"],
        )


@dataclass(frozen=True)
class ShiftGuard:
    """The same test on the query images and captions alone (`blind/*`, no model queries)."""

    outcome: Outcome
    alpha: float
    features: tuple[str, ...]  # the inputs, embeddings summarised
    suspect_fit: int
    reference_fit: int

    @property
    def detected(self) -> bool:
        """The query data alone tells the suspect set from the reference set."""
        return self.outcome.p_value < self.alpha

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d, "outcome": self.outcome.to_dict(), "detected": self.detected}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShiftGuard:
        return cls(
            Outcome.from_dict(d["outcome"]),
            d["alpha"],
            tuple(d["features"]),
            d["suspect_fit"],
            d["reference_fit"],
        )


@dataclass(frozen=True)
class GroupRow:
    """One group's (user's, artist's) test; `q_value` is its Benjamini-Hochberg adjusted p."""

    name: str
    size: int
    outcome: Outcome | None  # None: too small to test
    q_value: float | None
    shift_p: float | None  # the shift guard's p for this group (None: not run)
    decision: str
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outcome"] = None if self.outcome is None else self.outcome.to_dict()
        return {**d, "q_value": _num(self.q_value), "shift_p": _num(self.shift_p)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupRow:
        outcome = None if d["outcome"] is None else Outcome.from_dict(d["outcome"])
        q, s = d["q_value"], d["shift_p"]
        return cls(d["name"], d["size"], outcome, q, s, d["decision"], d.get("note", ""))


@dataclass(frozen=True)
class CalibratedTest:
    """The audit's second test (`setlevel.calibrated`): Bonferroni's p-value over the
    calibrated rows, each a one-sided Mann-Whitney test, and its subset-size curve."""

    p_value: float
    best: str  # the row with the smallest p-value
    rows: dict[str, float]  # row -> its own one-sided p-value
    auc: float  # the best row's AUC of suspect against reference scores
    suspect_n: int
    reference_n: int
    sizes: tuple[int, ...] = ()  # suspect subset sizes k (with a proportional share of R)
    medians: tuple[float, ...] = ()  # median p-value over random subsets of each size
    smallest_size: int | None = None  # smallest k from which the median stays below 0.01

    def detected(self, alpha: float) -> bool:
        return self.p_value < alpha

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibratedTest:
        return cls(**{**d, "sizes": tuple(d["sizes"]), "medians": tuple(d["medians"])})


@dataclass(frozen=True)
class DatasetInferenceResult:
    """The answer to "was this collection used to train the model?" and how it was reached."""

    decision: str  # DETECTED, CONFOUNDED or NOT_DETECTED
    alpha: float
    outcome: Outcome  # the test on the suspect and reference samples not used for fitting
    aggregation: str  # "shadow", "held-out" or "shadow+held-out"
    suspect_size: int  # |S| given
    reference_size: int  # |R| given
    suspect_fit: int  # of them used to fit the aggregation (held-out part)
    reference_fit: int
    shadow_rows: int  # shadow models' rows used to fit the aggregation
    features: tuple[str, ...]  # the aggregation's inputs
    dropped_features: tuple[str, ...]  # left out: not finite in every row
    curve: SizeCurve | None
    shift: ShiftGuard | None  # None: no blind/* features in the query tables
    groups: tuple[GroupRow, ...] = ()
    group_by: str | None = None
    seed: int = 0
    assumptions: tuple[str, ...] = ASSUMPTIONS
    calibrated: CalibratedTest | None = None  # the second test (`calibrated.py`), if run
    difficulty_models: int = 0  # shadows whose queries of each sample calibrate it (0: none)
    difficulty_weight: float | None = None  # median over features of `audit.difficulty_weights`
    difficulty_note: str = ""  # why the features were not calibrated ("" when they were)
    uncalibrated: Outcome | None = None  # the same test on raw features, where calibrated
    # the aggregation on left-out shadows: (AUC, one-sided p) (`audit.shadow_transfer`)
    shadow_transfer: tuple[float, float] | None = None

    @property
    def difficulty(self) -> str:
        """How the tested features were calibrated, in words."""
        if not self.difficulty_models:
            why = f": {self.difficulty_note}" if self.difficulty_note else ""
            return f"raw features (no difficulty calibration{why})"
        return (
            f"each sample's features minus their regression on the mean of "
            f"{self.difficulty_models} shadow models' queries of it (difficulty-calibrated; "
            f"median weight {self.difficulty_weight:.2f})"
        )

    @property
    def p_value(self) -> float:
        return self.outcome.p_value

    @property
    def statement(self) -> str:
        """The finding in one plain sentence, with the numbers it rests on."""
        o = self.outcome
        p = f"p = {o.p_value:.2g} ({o.test}, one-sided, alpha = {self.alpha:g})"
        sizes = f"{o.suspect_n} suspect vs {o.reference_n} reference samples tested"
        if self.decision == DETECTED:
            return (
                f"Detected: the suspect set looks more like training data than the reference "
                f"set, {p}, AUC {o.auc:.3f}, {sizes}: evidence the model was trained on it."
            )
        if self.decision == CONFOUNDED:
            s = self.shift.outcome
            return (
                f"Confounded: the suspect set scores higher ({p}), but the query images and "
                f"captions alone tell it from the reference set (shift guard p = "
                f"{s.p_value:.2g}, AUC {s.auc:.3f}, d = {s.effect_size:.2f}; membership "
                f"AUC {o.auc:.3f}, d = {o.effect_size:.2f}): the difference may be distribution "
                "shift, not training. Bring a reference set from the same distribution."
            )
        return (
            f"Not detected: {p}, {sizes}. This is no evidence that the set was unused; the "
            "signal may be too weak for this many samples."
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            version=FORMAT_VERSION,
            p_value=_num(self.p_value),
            statement=self.statement,
            outcome=self.outcome.to_dict(),
            curve=None if self.curve is None else self.curve.to_dict(),
            shift=None if self.shift is None else self.shift.to_dict(),
            groups=[g.to_dict() for g in self.groups],
            uncalibrated=None if self.uncalibrated is None else self.uncalibrated.to_dict(),
            difficulty=self.difficulty,
        )
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetInferenceResult:
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"dataset_inference.json version {d.get('version')!r} unknown")
        return cls(
            decision=d["decision"],
            alpha=d["alpha"],
            outcome=Outcome.from_dict(d["outcome"]),
            aggregation=d["aggregation"],
            suspect_size=d["suspect_size"],
            reference_size=d["reference_size"],
            suspect_fit=d["suspect_fit"],
            reference_fit=d["reference_fit"],
            shadow_rows=d["shadow_rows"],
            features=tuple(d["features"]),
            dropped_features=tuple(d["dropped_features"]),
            curve=None if d["curve"] is None else SizeCurve.from_dict(d["curve"]),
            shift=None if d["shift"] is None else ShiftGuard.from_dict(d["shift"]),
            groups=tuple(GroupRow.from_dict(g) for g in d["groups"]),
            group_by=d["group_by"],
            seed=d["seed"],
            assumptions=tuple(d["assumptions"]),
            calibrated=CalibratedTest.from_dict(d["calibrated"]) if d.get("calibrated") else None,
            difficulty_models=d.get("difficulty_models", 0),
            difficulty_weight=d.get("difficulty_weight"),
            difficulty_note=d.get("difficulty_note", ""),
            shadow_transfer=tuple(d["shadow_transfer"]) if d.get("shadow_transfer") else None,
            uncalibrated=Outcome.from_dict(d["uncalibrated"]) if d.get("uncalibrated") else None,
        )


def decide(p_value: float, alpha: float, shift_detected: bool) -> str:
    """DETECTED when p < alpha and no shift; CONFOUNDED when p < alpha with a shift."""
    if not p_value < alpha:
        return NOT_DETECTED
    return CONFOUNDED if shift_detected else DETECTED
