"""Dataset inference: was this collection (the suspect set S) used to train the model?

    suspect = take_rows(target_table, suspect_ids, "suspect set")
    reference = take_rows(target_table, reference_ids, "reference set")
    shadows = [take_rows(t, None, f"shadow {t.model_index}") for t in shadow_tables]
    result = dataset_inference(suspect, reference, shadows, options=AuditOptions(alpha=0.01))
    result.decision, result.p_value, result.curve.smallest_size

The method (after Dubinski et al., "CDI", CVPR 2025, arXiv 2411.12858, adapted to text-to-image
queries):

1. Features: every black-box and gray-box feature the queries produced for each sample (pixel,
   semantic, text, quality, loss, SecMI, PIA, CLiD, ...). Each alone may be at chance (AUC
   0.50-0.53 per sample); summed over hundreds of samples a weak signal becomes a strong one.
2. Aggregation: one linear score per sample (`scorer.py`), learned WITHOUT the samples it then
   tests — on shadow models' rows, whose membership the attacker knows (`shadow`, the default
   when shadow rows are given: no suspect sample is spent on fitting), or on a random part of S
   and R labelled suspect/reference, as CDI does (`held-out`), or both (`procedure.py`).
3. Test: one-sided, "the tested suspect scores are larger than the tested reference scores".
   Welch's t-test (scipy.stats.ttest_ind, unequal variances) where the means of at least 30
   scores a side of a not strongly skewed distribution make it reliable; otherwise a permutation
   test (scipy.stats.permutation_test), exact for any distribution (`stats.py`).
   Difficulty (`difficulty`): where the shadow models were also queried on the tested samples
   (`calibration` rows: the attack command does so for LiRA), each tested sample's features are
   taken minus their regression on the mean of the shadows' features of the same sample
   (`difficulty_weights`, a control variate fitted on S and R together without labels) before
   scoring, as offline LiRA calibrates a per-sample score (Carlini et al. 2022). Some images are
   easy to denoise or reconstruct whether seen or not; that difficulty is most of a raw
   feature's spread across samples, and the shadows that never trained on the sample (its OUT
   queries) measure it. What is left is the target's own deviation, so the same membership shift
   is a larger effect (on the demo's queries: d 2.8 raw, 3.7 calibrated). It needs the `shadow`
   aggregation (the score is fixed before any tested sample is seen) and every tested sample
   queried on every shadow; `auto` applies it exactly then, and the result keeps the raw test
   beside it.
   Learnability (`shadow_transfer`): with two or more shadows in the aggregation, each
   shadow's rows are scored by the aggregation fitted on the others. Where its members do not
   rank significantly higher than its non-members, nothing shows that the score learns
   membership at all, and a "not detected" says little about the suspect set; the report says
   so. The size curve reuses the difficulty weights fitted on all of S and R (a little
   optimistic for small subsets).
4. Shift guard: steps 2-3 on the `blind/*` features alone (the query image and caption, no
   model query), always with a held-out aggregation (the shadows' halves are alike by
   construction, so they cannot learn a shift between S and R). If it detects the suspect set at
   `shift_alpha`, the result is `confounded`: S and R differ before any model is asked.
5. Set size: the median p-value (and quartiles) over random subsets of k suspect samples
   (`curve.py`); user-level sets: one p-value per group, Benjamini-Hochberg (`groups.py`).

What it assumes, in plain words: the samples are independent of each other; the reference set
was not used for training and comes from the same distribution as the suspect set. Under those,
when S was not used the p-value is uniform (calibrated: a 1% level detects 1% of unused sets).
With difficulty calibration, a sample's calibration must not depend on its set: the shadows
query S and R alike (the attack command queries every shadow on all of the target's samples).
A small p-value says S looks more like training data than R does; by itself it cannot tell
training on S from S and R differing in some way the shift guard does not see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lightning_mia.setlevel.curve import size_curve
from lightning_mia.setlevel.difficulty import (
    difficulty_means,
    difficulty_weights,
    shadow_transfer,
)
from lightning_mia.setlevel.groups import group_rows
from lightning_mia.setlevel.procedure import (
    AGGREGATIONS,
    Aggregation,
    Plan,
    held_out_problem,
    make_plan,
    resolve_aggregation,
    run_test,
)
from lightning_mia.setlevel.result import (
    ASSUMPTIONS,
    CALIBRATION_ASSUMPTION,
    DatasetInferenceResult,
    ShiftGuard,
    decide,
)
from lightning_mia.setlevel.rows import (
    FeatureRows,
    SetLevelError,
    blind_features,
    check_disjoint,
    check_shadows,
    finite_columns,
    group_labels,
    membership_features,
)
from lightning_mia.setlevel.stats import TEST_CHOICES, Outcome, TestChoice

Difficulty = Literal["auto", "shadows", "none"]
DIFFICULTIES = ("auto", "shadows", "none")


@dataclass(frozen=True)
class AuditOptions:
    """How a set-level audit is run (every field has a sound default)."""

    alpha: float = 0.01  # level of the decision
    aggregation: Aggregation = "auto"  # auto: "shadow" with shadow rows, else "held-out"
    fit_fraction: float = 0.5  # share of S and R fitted on in a held-out aggregation
    test: TestChoice = "auto"  # auto: Welch where safe, else permutation
    permutations: int = 9999  # resamples of a permutation test
    shift_alpha: float = 0.05  # level of the shift guard (looser than alpha: it must not miss)
    subset_repeats: int = 100  # random subsets per size on the curve (0: no curve)
    subset_points: int = 16  # sizes on the curve
    subset_sizes: tuple[int, ...] = ()  # sizes the curve also holds (those <= |S|): 100, 300...
    l2: float = 1.0  # ridge penalty of the logistic aggregation
    embedding_components: int = 8  # principal components kept per blind embedding
    features: tuple[str, ...] = ()  # prefixes of membership features to use; () = all
    difficulty: Difficulty = "auto"  # "shadows": minus the shadows' features of each sample;
    # "auto": that where every tested sample has them under the shadow aggregation; "none"
    seed: int = 0

    def problems(self) -> list[str]:
        """Every problem with these options (empty when they are usable)."""
        out = []
        for name in ("alpha", "shift_alpha", "fit_fraction"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                out.append(f"{name} must lie strictly between 0 and 1, got {value}")
        if self.aggregation not in AGGREGATIONS:
            out.append(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.difficulty not in DIFFICULTIES:
            out.append(f"difficulty must be one of {DIFFICULTIES}, got {self.difficulty!r}")
        if self.test not in TEST_CHOICES:
            out.append(f"test must be one of {TEST_CHOICES}, got {self.test!r}")
        for name in ("permutations", "subset_points", "embedding_components"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if any(k < 1 for k in self.subset_sizes):
            out.append(f"subset_sizes must be positive, got {list(self.subset_sizes)}")
        if self.subset_repeats < 0:
            out.append(f"subset_repeats must be >= 0, got {self.subset_repeats}")
        if not self.l2 > 0:
            out.append(f"l2 must be positive, got {self.l2}")
        return out


def _plan(
    names: list[str], shadows: Sequence[FeatureRows], aggregation: str, o: AuditOptions
) -> Plan:
    x = np.concatenate([s.matrix(names) for s in shadows]) if shadows else np.zeros((0, len(names)))
    y = (
        np.concatenate([s.is_member for s in shadows]).astype(np.float64)
        if shadows
        else np.zeros(0)
    )
    return make_plan(
        names,
        x,
        y,
        aggregation,
        o.fit_fraction,
        o.l2,
        o.embedding_components,
        o.test,
        o.permutations,
    )


def _check_inputs(
    suspect: FeatureRows,
    reference: FeatureRows,
    shadows: Sequence[FeatureRows],
    aggregation: str,
    options: AuditOptions,
    image_digests: Mapping[int, bytes] | None,
) -> None:
    problems = options.problems()
    if problems:
        raise SetLevelError("; ".join(problems))
    check_disjoint(suspect, reference, image_digests)
    check_shadows(shadows)
    need = 2 if aggregation == "shadow" else None
    for rows in (suspect, reference):
        if need is not None and len(rows) < need:
            raise SetLevelError(f"{rows.name} has {len(rows)} samples; the test needs {need}")
        if need is None and (p := held_out_problem(len(rows), rows.name, options.fit_fraction)):
            raise SetLevelError(p)


def _difficulty(
    options: AuditOptions,
    aggregation: str,
    calibration: Sequence[FeatureRows],
    names: Sequence[str],
    suspect: FeatureRows,
    reference: FeatureRows,
) -> list[np.ndarray] | str:
    """The shadows' OUT means of the suspect and reference samples (`difficulty_means`), or
    why the audit does not calibrate difficulty; `SetLevelError` when asked for (`shadows`)
    and impossible."""
    if options.difficulty == "none":
        return "difficulty: none"
    means = difficulty_means(aggregation, calibration, names, suspect, reference)
    if isinstance(means, str) and options.difficulty == "shadows":
        raise SetLevelError(f"difficulty calibration (difficulty: shadows) cannot run: {means}")
    return means


def shift_guard(
    suspect: FeatureRows, reference: FeatureRows, options: AuditOptions, rng: np.random.Generator
) -> tuple[ShiftGuard | None, Plan | None]:
    """The test on `blind/*` features alone (held-out aggregation), and its plan; (None, None)
    when the rows have no finite blind features or a set is too small to split."""
    names, _ = finite_columns(blind_features(suspect, reference), suspect, reference)
    too_small = any(
        held_out_problem(len(r), r.name, options.fit_fraction) for r in (suspect, reference)
    )
    if not names or too_small:
        return None, None
    empty = np.zeros((0, len(names)))
    o = options
    plan = make_plan(
        names,
        empty,
        np.zeros(0),
        "held-out",
        o.fit_fraction,
        o.l2,
        o.embedding_components,
        o.test,
        o.permutations,
    )
    outcome, s_fit, r_fit, scorer = run_test(
        plan, suspect.matrix(names), reference.matrix(names), rng
    )
    return ShiftGuard(outcome, options.shift_alpha, scorer.used, s_fit, r_fit), plan


def dataset_inference(
    suspect: FeatureRows,
    reference: FeatureRows,
    shadows: Sequence[FeatureRows] = (),
    groups: Mapping[int, object] | None = None,
    group_by: str | None = None,
    image_digests: Mapping[int, bytes] | None = None,
    options: AuditOptions = AuditOptions(),
    calibration: Sequence[FeatureRows] = (),
) -> DatasetInferenceResult:
    """Test whether the suspect set was used to train the model that produced its features.

    Args:
        suspect: the suspect set's rows (S).
        reference: rows of samples known to be unused, from the same distribution (R).
        shadows: shadow models' rows with `is_member` (to learn the aggregation on).
        calibration: each shadow model's rows of (at least) the tested samples, to calibrate
            each sample's difficulty (`options.difficulty`).
        groups: sample id -> group (user, artist) of each suspect sample: one test per group.
        group_by: the name of the group column, for messages and the report.
        image_digests: sample id -> image content digest of S and R, to refuse equal images.
        options: level, aggregation, test, curve.
    """
    aggregation = resolve_aggregation(options.aggregation, bool(shadows))
    _check_inputs(suspect, reference, shadows, aggregation, options, image_digests)
    labels = None if groups is None else group_labels(suspect, groups, group_by or "group")
    candidates = membership_features(suspect, reference, *shadows, prefixes=options.features)
    names, dropped = finite_columns(candidates, suspect, reference, *shadows)
    if not names:
        raise SetLevelError(f"no membership feature is finite in every row: {dropped[:5]}")
    means = _difficulty(options, aggregation, calibration, names, suspect, reference)
    plan = _plan(names, shadows, aggregation, options)
    xs, xr = suspect.matrix(names), reference.matrix(names)
    rng = np.random.default_rng(options.seed)
    outcome, s_fit, r_fit, scorer = run_test(plan, xs, xr, rng)
    shift, blind_plan = shift_guard(suspect, reference, options, rng)
    calibrated = Calibrated(outcome, None, None, ASSUMPTIONS)
    if not isinstance(means, str):  # each feature minus its regression on the shadows' OUT mean
        xs, xr, calibrated = Calibrated.of(plan, xs, xr, *means, outcome, options.seed + 3)
        outcome = calibrated.outcome
    curve = None
    if options.subset_repeats:
        repeats, points = options.subset_repeats, options.subset_points
        curve = size_curve(
            plan, xs, xr, repeats, points, options.seed + 1, tuple(options.subset_sizes)
        )
    group_table = (
        ()
        if labels is None
        else _groups(plan, blind_plan, xs, xr, suspect, reference, labels, options)
    )
    return DatasetInferenceResult(
        decision=decide(outcome.p_value, options.alpha, bool(shift and shift.detected)),
        alpha=options.alpha,
        outcome=outcome,
        aggregation=aggregation,
        suspect_size=len(suspect),
        reference_size=len(reference),
        suspect_fit=s_fit,
        reference_fit=r_fit,
        shadow_rows=len(plan.shadow_y),
        features=scorer.used,
        dropped_features=tuple(dropped),
        curve=curve,
        shift=shift,
        groups=group_table,
        group_by=group_by if labels is not None else None,
        seed=options.seed,
        assumptions=calibrated.assumptions,
        difficulty_models=0 if isinstance(means, str) else len(calibration),
        difficulty_note=means if isinstance(means, str) else "",
        difficulty_weight=calibrated.weight,
        uncalibrated=calibrated.uncalibrated,
        shadow_transfer=_transfer(names, shadows, plan, options),
    )


def _groups(
    plan: Plan,
    blind_plan: Plan | None,
    xs: np.ndarray,
    xr: np.ndarray,
    suspect: FeatureRows,
    reference: FeatureRows,
    labels: np.ndarray,
    o: AuditOptions,
) -> tuple:
    """One test per group of the suspect set (`groups.group_rows`) on the tested matrices."""
    blind = blind_plan.names if blind_plan else ()
    blind_s, blind_r = suspect.matrix(blind), reference.matrix(blind)
    args = (plan, blind_plan, xs, xr, blind_s, blind_r, labels)
    return group_rows(*args, o.alpha, o.shift_alpha, o.seed + 2)


def _transfer(
    names: Sequence[str], shadows: Sequence[FeatureRows], plan: Plan, o: AuditOptions
) -> tuple[float, float] | None:
    """The aggregation on left-out shadows, where shadows fit it (`difficulty.shadow_transfer`)."""
    return (
        shadow_transfer(names, shadows, o.l2, o.embedding_components)
        if plan.shadow_y.size
        else None
    )


@dataclass(frozen=True)
class Calibrated:
    """The test on the tested features, difficulty-calibrated or not, and what it rests on."""

    outcome: Outcome  # the test that decides
    uncalibrated: Outcome | None  # the raw test, kept beside a calibrated one
    weight: float | None  # median difficulty weight over features (None: not calibrated)
    assumptions: tuple[str, ...]

    @classmethod
    def of(
        cls,
        plan: Plan,
        xs: np.ndarray,
        xr: np.ndarray,
        ms: np.ndarray,
        mr: np.ndarray,
        raw: Outcome,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray, Calibrated]:
        """(calibrated suspect and reference features, the test on them): each feature of `xs`,
        `xr` minus its regression on the shadows' OUT means `ms`, `mr` of the same samples
        (`difficulty.difficulty_weights`); `raw` is the test on the features as they are."""
        weights = difficulty_weights(np.concatenate([xs, xr]), np.concatenate([ms, mr]))
        xs, xr = xs - weights * ms, xr - weights * mr
        outcome = run_test(plan, xs, xr, np.random.default_rng(seed))[0]
        assumptions = (*ASSUMPTIONS, CALIBRATION_ASSUMPTION)
        return xs, xr, cls(outcome, raw, float(np.median(weights)), assumptions)
