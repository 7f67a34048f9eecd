"""Tests of significance for a set-level audit: pure functions of two samples of scores.

    outcome = one_sided_test(suspect, reference, "auto", permutations=9999, seed=0)
    outcome.p_value, outcome.effect_size, outcome.auc

Scores are higher for samples that look more like training members. Every test is one-sided:

    H0  the suspect scores and the reference scores come from one distribution
    H1  the suspect scores are larger (the suspect set looks more like training data)

- **Welch's t-test** (`scipy.stats.ttest_ind(equal_var=False, alternative="greater")`) compares
  the means without assuming equal variances. It is exact for normal scores and, by the central
  limit theorem, close to exact for means of a few dozen scores of a distribution that is not
  strongly skewed.
- **The permutation test** (`scipy.stats.permutation_test`, difference of means) is exact for any
  distribution when the scores are exchangeable under H0 (which independent samples from one
  distribution are): its p-value is the share of random relabellings of the pooled scores whose
  difference of means is at least the observed one, counting the observed labelling
  ((1 + #) / (1 + resamples); all relabellings are enumerated when they are fewer).
- `"auto"` takes Welch where its approximation is safe — at least `WELCH_MIN_SIZE` scores on each
  side and each side's skewness within +-`SKEW_LIMIT` (judged per side: a shift between the sides
  is the signal, not a departure from normality) — and the permutation test otherwise.

Effect sizes beside the p-value: the difference of means, Cohen's d (that difference over the
pooled standard deviation) and the AUC, the probability that a random suspect score exceeds a
random reference score (ties count half; `U / (n_s n_r)` of the Mann-Whitney test).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

TestChoice = Literal["auto", "welch", "permutation"]
TEST_CHOICES = ("auto", "welch", "permutation")
WELCH_MIN_SIZE = 30  # scores per side below which "auto" permutes
SKEW_LIMIT = 1.0  # |pooled skewness| above which "auto" permutes


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


@dataclass(frozen=True)
class Outcome:
    """One one-sided test of suspect scores against reference scores."""

    test: str  # "welch" or "permutation"
    p_value: float
    statistic: float  # Welch's t, or the difference of means for the permutation test
    mean_difference: float  # mean(suspect) - mean(reference)
    effect_size: float  # Cohen's d (pooled standard deviation)
    auc: float  # P(suspect score > reference score), ties half
    suspect_n: int
    reference_n: int
    reason: str  # why this test was chosen

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("p_value", "statistic", "mean_difference", "effect_size", "auc"):
            d[key] = _finite_or_none(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Outcome:
        nan = float("nan")
        values = {k: (nan if d[k] is None else d[k]) for k in d}
        return cls(**values)


def cohens_d(suspect: np.ndarray, reference: np.ndarray) -> float:
    """(mean_s - mean_r) / pooled standard deviation; 0 when both sides are constant and equal."""
    ns, nr = len(suspect), len(reference)
    diff = float(np.mean(suspect) - np.mean(reference))
    dof = ns + nr - 2
    if dof <= 0:
        return float("nan")
    squares = np.sum((suspect - np.mean(suspect)) ** 2) + np.sum(
        (reference - np.mean(reference)) ** 2
    )
    sd = math.sqrt(float(squares) / dof)
    if sd == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / sd


def auc_greater(suspect: np.ndarray, reference: np.ndarray) -> float:
    """P(a suspect score > a reference score) + P(tie) / 2: the Mann-Whitney U statistic of
    `scipy.stats.mannwhitneyu(suspect, reference)` over n_s n_r, counted on the sorted reference
    (for each suspect score, the reference scores below it and half of those equal to it)
    without the p-value the audit does not use (a thousandth of the time)."""
    ordered = np.sort(reference)
    below = np.searchsorted(ordered, suspect, side="left")
    not_above = np.searchsorted(ordered, suspect, side="right")
    u = float(np.sum(below + (not_above - below) / 2))
    return u / (len(suspect) * len(reference))


def welch_greater(suspect: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(t, p) of Welch's one-sided t-test that the suspect mean is larger. Both sides constant
    (where scipy gives NaN): p = 1 unless the suspect constant is the larger (then p = 0)."""
    if np.ptp(suspect) == 0 and np.ptp(reference) == 0:
        diff = float(suspect[0] - reference[0])
        return (0.0, 1.0) if diff <= 0 else (math.inf, 0.0)
    res = stats.ttest_ind(suspect, reference, equal_var=False, alternative="greater")
    return float(res.statistic), float(res.pvalue)


def _mean_difference(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def permutation_greater(
    suspect: np.ndarray, reference: np.ndarray, permutations: int, seed: int
) -> tuple[float, float]:
    """(difference of means, p) of a one-sided permutation test (`permutations` random
    relabellings, or every one when there are fewer)."""
    res = stats.permutation_test(
        (suspect, reference),
        _mean_difference,
        permutation_type="independent",
        vectorized=True,
        n_resamples=permutations,
        alternative="greater",
        rng=np.random.default_rng(seed),
    )
    return float(res.statistic), float(res.pvalue)


def skewness(x: np.ndarray) -> np.ndarray:
    """Skewness along the last axis, `scipy.stats.skew`'s default (the biased Fisher-Pearson
    coefficient m3 / m2^1.5), 0 for a constant row; in numpy, for many rows at once (scipy's
    per-call overhead was most of an audit's time)."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=-1, keepdims=True)
    m2 = np.mean(centred**2, axis=-1)
    m3 = np.mean(centred**3, axis=-1)
    constant = np.ptp(x, axis=-1) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(constant, 0.0, m3 / np.where(constant, 1.0, m2) ** 1.5)


def choose_test(
    suspect: np.ndarray,
    reference: np.ndarray,
    requested: TestChoice,
    skew: float | None = None,
) -> tuple[str, str]:
    """(test name, reason): the requested test, or for "auto" Welch when it is safe. `skew`:
    the larger |skewness| of the two sides, when the caller has it already."""
    if requested == "welch":
        return "welch", "Welch t-test, as requested"
    if requested == "permutation":
        return "permutation", "permutation test, as requested"
    smaller = min(len(suspect), len(reference))
    if smaller < WELCH_MIN_SIZE:
        return "permutation", f"permutation test: {smaller} < {WELCH_MIN_SIZE} scores on a side"
    if skew is None:
        skew = float(max(abs(skewness(suspect)), abs(skewness(reference))))
    if skew > SKEW_LIMIT:
        return (
            "permutation",
            f"permutation test: scores skewed (|skewness| {skew:.2f} > {SKEW_LIMIT})",
        )
    return "welch", f"Welch t-test: >= {WELCH_MIN_SIZE} scores a side, |skewness| {skew:.2f}"


def test_p_value(
    suspect: np.ndarray,
    reference: np.ndarray,
    test: TestChoice = "auto",
    permutations: int = 9999,
    seed: int = 0,
) -> tuple[str, str, float, float]:
    """(test name, reason, statistic, p) of the one-sided test on 1-D float64 score arrays."""
    name, reason = choose_test(suspect, reference, test)
    if name == "welch":
        return name, reason, *welch_greater(suspect, reference)
    return name, reason, *permutation_greater(suspect, reference, permutations, seed)


def one_sided_test(
    suspect: np.ndarray,
    reference: np.ndarray,
    test: TestChoice = "auto",
    permutations: int = 9999,
    seed: int = 0,
) -> Outcome:
    """Test H1 "suspect scores are larger" on 1-D score arrays (at least 2 on each side)."""
    suspect = np.asarray(suspect, dtype=np.float64).reshape(-1)
    reference = np.asarray(reference, dtype=np.float64).reshape(-1)
    if len(suspect) < 2 or len(reference) < 2:
        raise ValueError(f"need 2 scores a side, got {len(suspect)} and {len(reference)}")
    if not (np.isfinite(suspect).all() and np.isfinite(reference).all()):
        raise ValueError("scores must be finite")
    name, reason, statistic, p = test_p_value(suspect, reference, test, permutations, seed)
    if name == "permutation":  # its p-value cannot fall below 1 / (resamples + 1)
        reason += f" ({permutations} resamples: p >= {1 / (permutations + 1):.1e})"
    return Outcome(
        test=name,
        p_value=p,
        statistic=statistic,
        mean_difference=float(np.mean(suspect) - np.mean(reference)),
        effect_size=cohens_d(suspect, reference),
        auc=auc_greater(suspect, reference),
        suspect_n=len(suspect),
        reference_n=len(reference),
        reason=reason,
    )


def batch_p_values(
    suspect: np.ndarray,
    reference: np.ndarray,
    test: TestChoice = "auto",
    permutations: int = 999,
    seed: int = 0,
) -> np.ndarray:
    """(m,) p-values of m independent one-sided tests at once: row i of suspect (m, a) against
    row i of reference (m, b), each with the test `choose_test` picks for it. Permutation tests
    share their relabellings across rows (each row's p-value is still exact)."""
    m = len(suspect)
    skews = np.maximum(np.abs(skewness(suspect)), np.abs(skewness(reference)))
    welch = np.array(
        [choose_test(s, r, test, k)[0] == "welch" for s, r, k in zip(suspect, reference, skews)]
    )
    p = np.empty(m)
    if welch.any():
        res = stats.ttest_ind(
            suspect[welch], reference[welch], axis=1, equal_var=False, alternative="greater"
        )
        p[welch] = res.pvalue
        for i in np.flatnonzero(welch & np.isnan(p)):  # both sides constant: see welch_greater
            p[i] = welch_greater(suspect[i], reference[i])[1]
    if (~welch).any():
        res = stats.permutation_test(
            (suspect[~welch], reference[~welch]),
            _mean_difference,
            permutation_type="independent",
            vectorized=True,
            n_resamples=permutations,
            alternative="greater",
            axis=1,
            rng=np.random.default_rng(seed),
        )
        p[~welch] = res.pvalue
    return p


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """BH-adjusted p-values (q-values): reject where q <= level controls the false discovery
    rate at `level` for independent or positively dependent tests."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p
    return stats.false_discovery_control(p, method="bh")
