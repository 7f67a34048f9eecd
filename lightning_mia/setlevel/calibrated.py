"""The set-level audit's second test: per-sample scores calibrated by reference models.

    test = calibrated_scores_test({"lira-offline-loss": (ids, scores), ...}, suspect, reference)
    test.p_value, test.best, test.rows["lira-offline-loss"]

The main test (`audit.py`) learns one linear score over raw features, so the per-sample
difficulty of each image (some are easy to denoise whether seen or not) stays in its variance.
LiRA-calibrated attack scores (`attack/calibration.py`: each sample's score against the
distribution of the shadow models' scores of the same sample, which never trained on it) remove
that difficulty; on the onset points they separate a member set from its non-members with
p-values orders of magnitude below the main test's (seq2seq, 20 steps per image with crop and
flip: 5e-9 against 0.044; README, "set-level audit").

The test: for each calibrated row, a one-sided Mann-Whitney U test (scipy.stats.mannwhitneyu,
"the suspect set's scores are larger"), and the family's p-value is Bonferroni's over the rows
(the smallest p times their number, at most 1). It is valid where each row's scoring rule was
fixed without the suspect/reference labels, as the shadow setting's attacks are (fitted on the
shadows' rows alone): the scores are then exchangeable between S and R when S was not used, so
each row's p-value is uniform (or conservative with ties) and Bonferroni keeps the chance of a
false detection below alpha whatever the rows' dependence. It assumes what the main test
assumes: independent samples, and R from the distribution of S.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import mannwhitneyu

from lightning_mia.setlevel.curve import MIN_SIZE, reference_size, size_grid, smallest_size
from lightning_mia.setlevel.result import CalibratedTest

CALIBRATED_PREFIX = "lira-"  # the report rows calibrated by reference (shadow) models


def _values(
    rows: Mapping[str, tuple[Sequence[int], Sequence[float]]],
) -> dict[str, dict[int, float]]:
    """sample id -> finite score, of every calibrated row."""
    out = {}
    for name, (ids, scores) in rows.items():
        if name.startswith(CALIBRATED_PREFIX):
            out[name] = {i: v for i, v in zip(map(int, ids), map(float, scores)) if np.isfinite(v)}
    return out


def _matrix(values: dict[str, dict[int, float]], ids: set[int]) -> np.ndarray:
    """(rows, n) scores of the samples of `ids` that every row scored."""
    common = sorted(i for i in ids if all(i in v for v in values.values()))
    return np.array([[v[i] for i in common] for v in values.values()]).reshape(len(values), -1)


def _subset_medians(
    xs: np.ndarray, xr: np.ndarray, sizes: list[int], repeats: int, seed: int
) -> list[float]:
    """Median Bonferroni p-value over `repeats` random subsets of k suspect samples (and a
    proportional share of the reference samples), the same samples in every row, for each k
    of `sizes`; `xs` (rows, |S|) and `xr` (rows, |R|) hold the rows' scores."""
    rng = np.random.default_rng(seed)
    medians = []
    for k in sizes:
        kr = reference_size(k, xs.shape[1], xr.shape[1])
        s = np.stack([rng.choice(xs.shape[1], k, replace=False) for _ in range(repeats)])
        r = np.stack([rng.choice(xr.shape[1], kr, replace=False) for _ in range(repeats)])
        p = mannwhitneyu(xs[:, s], xr[:, r], alternative="greater", axis=2).pvalue
        medians.append(float(np.median(np.minimum(1.0, p.min(axis=0) * len(xs)))))
    return medians


def _row_tests(
    values: dict[str, dict[int, float]], suspect: set[int], reference: set[int]
) -> tuple[dict[str, float], dict[str, float], dict[str, tuple[int, int]]]:
    """(p-value, AUC, (n_s, n_r)) of each row's one-sided Mann-Whitney test. Rows that score
    the same samples are tested in one `mannwhitneyu(axis=1)` call (the per-call overhead was
    most of an audit's time), where both sides exceed 8 samples: there scipy takes the
    asymptotic test whatever the ties, as it does row by row, so the p-values are the same."""
    groups: dict[tuple, list[str]] = {}
    tested = []  # the rows with samples on both sides, in the order of `values`
    for name, v in values.items():
        s_ids = tuple(i for i in v if i in suspect)
        r_ids = tuple(i for i in v if i in reference)
        if s_ids and r_ids:
            tested.append(name)
            groups.setdefault((s_ids, r_ids), []).append(name)
    p_values, aucs, sets = {}, {}, {}
    for (s_ids, r_ids), names in groups.items():
        chunks = [names] if min(len(s_ids), len(r_ids)) > 8 else [[n] for n in names]
        for chunk in chunks:
            s = np.array([[values[n][i] for i in s_ids] for n in chunk])
            r = np.array([[values[n][i] for i in r_ids] for n in chunk])
            test = mannwhitneyu(s, r, alternative="greater", axis=1)
            for j, name in enumerate(chunk):
                p_values[name] = float(test.pvalue[j])
                aucs[name] = float(test.statistic[j]) / (len(s_ids) * len(r_ids))
                sets[name] = (len(s_ids), len(r_ids))
    return (
        {n: p_values[n] for n in tested},
        {n: aucs[n] for n in tested},
        {n: sets[n] for n in tested},
    )


def calibrated_scores_test(
    rows: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    suspect_ids: Sequence[int],
    reference_ids: Sequence[int],
    repeats: int = 100,
    points: int = 16,
    seed: int = 0,
) -> CalibratedTest | None:
    """The test over `rows` (name -> (sample ids, scores), higher = member) whose names start
    with `CALIBRATED_PREFIX`; None when no such row scores samples of both sets. A row's
    samples outside S and R, or with a non-finite score, are left out. With `repeats` > 0 the
    same test on random subsets (`curve.py`'s grid of `points` sizes) gives the smallest set
    size whose median p-value stays below 0.01."""
    suspect, reference = set(map(int, suspect_ids)), set(map(int, reference_ids))
    values = _values(rows)
    p_values, aucs, sets = _row_tests(values, suspect, reference)
    if not p_values:
        return None
    best = min(p_values, key=p_values.get)
    values = {name: values[name] for name in p_values}
    xs, xr = _matrix(values, suspect), _matrix(values, reference)
    enough = repeats > 0 and xr.shape[1] >= MIN_SIZE
    sizes = size_grid(xs.shape[1], points) if enough else []
    medians = _subset_medians(xs, xr, sizes, repeats, seed) if sizes else []
    n_s, n_r = sets[best]
    return CalibratedTest(
        p_value=min(1.0, p_values[best] * len(p_values)),
        best=best,
        rows=p_values,
        auc=aucs[best],
        suspect_n=n_s,
        reference_n=n_r,
        sizes=tuple(sizes),
        medians=tuple(medians),
        smallest_size=smallest_size(sizes, medians) if sizes else None,
    )
