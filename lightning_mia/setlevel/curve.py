"""How many suspect samples an audit needs: p-values over random subsets of size k.

    curve = size_curve(plan, suspect_x, reference_x, repeats=100, points=16, seed=0)
    curve.smallest_size      # smallest k whose median p-value stays below 0.01

For each k on a geometric grid from `MIN_SIZE` to |S| (|S| included), `repeats` times: draw k
suspect samples and a proportional share of the reference set (k |R| / |S|, at least `MIN_SIZE`,
at most |R|), run the whole procedure on them (with a held-out aggregation, the split and the fit
happen inside the subset: k is what a data owner must bring), and keep the p-value. The curve is
the median with its quartiles. `smallest_size` is the smallest k from which the median stays
below `TARGET_P` at every larger k of the grid, so one lucky size does not count.

With a shadow-only aggregation the scores are computed once and only the subsets are redrawn;
the subsets at k = |S| are then the whole sets (one run). With a held-out one the point at k = |S|
shows how much the headline p-value depends on its random split. Permutation tests on the curve
use `CURVE_PERMUTATIONS` resamples (enough to resolve the 0.01 level it is read at).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lightning_mia.setlevel.procedure import Plan, score_sets
from lightning_mia.setlevel.result import TARGET_P, SizeCurve
from lightning_mia.setlevel.stats import batch_p_values

MIN_SIZE = 5  # smallest set size on the curve
CURVE_PERMUTATIONS = 999  # resamples per permutation test on the curve (p resolved to 0.001)


def size_grid(n: int, points: int, start: int = MIN_SIZE, extra: tuple[int, ...] = ()) -> list[int]:
    """About `points` integers from `start` to `n` (both included), evenly spaced in log, and
    the sizes of `extra` that lie between them (the sizes a report quotes: 100, 300...)."""
    if n < start:
        return []
    grid = np.unique(np.round(np.geomspace(start, n, max(points, 2))).astype(np.int64))
    return sorted({int(k) for k in grid} | {n} | {k for k in extra if start <= k <= n})


def reference_size(k: int, n_suspect: int, n_reference: int) -> int:
    """Reference samples drawn with k suspect samples: the same share of the reference set."""
    return int(min(n_reference, max(MIN_SIZE, round(k * n_reference / n_suspect))))


def smallest_size(sizes: list[int], medians: list[float], target: float = TARGET_P) -> int | None:
    """The smallest size from which every median is below `target`; None if the last is not."""
    found = None
    for k, m in zip(reversed(sizes), reversed(medians)):
        if not m < target:
            break
        found = k
    return found


def _p_values(
    plan: Plan,
    suspect: np.ndarray,
    reference: np.ndarray,
    k: int,
    kr: int,
    repeats: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(repeats,) p-values of runs on random subsets of k suspect and kr reference rows."""
    if not plan.held_out and k == len(suspect) and kr == len(reference):
        repeats = 1  # the whole sets under a fixed aggregation: every run is the same
    tested_s, tested_r = [], []
    for _ in range(repeats):
        s = suspect[rng.choice(len(suspect), k, replace=False)]
        r = reference[rng.choice(len(reference), kr, replace=False)]
        if plan.held_out:
            s, r = score_sets(plan, s, r, rng)[:2]
        # else `suspect`/`reference` hold the fixed aggregation's scores already (size_curve)
        tested_s.append(s)
        tested_r.append(r)
    seed = int(rng.integers(2**31))
    return batch_p_values(
        np.stack(tested_s), np.stack(tested_r), plan.test, plan.permutations, seed
    )


def size_curve(
    plan: Plan,
    suspect: np.ndarray,
    reference: np.ndarray,
    repeats: int = 100,
    points: int = 16,
    seed: int = 0,
    extra_sizes: tuple[int, ...] = (),
) -> SizeCurve | None:
    """Median p-value and quartiles per subset size (None when |S| < MIN_SIZE); `extra_sizes`
    join the grid where they are at most |S|."""
    sizes = size_grid(len(suspect), points, extra=extra_sizes)
    if not sizes or len(reference) < MIN_SIZE:
        return None
    rng = np.random.default_rng(seed)
    plan = replace(plan, permutations=min(plan.permutations, CURVE_PERMUTATIONS))
    if not plan.held_out:  # fixed aggregation: score once, redraw subsets of scores
        suspect, reference = plan.fixed.score(suspect), plan.fixed.score(reference)
    ref_sizes, med, low, high = [], [], [], []
    for k in sizes:
        kr = reference_size(k, len(suspect), len(reference))
        p = _p_values(plan, suspect, reference, k, kr, repeats, rng)
        q25, q50, q75 = np.quantile(p, [0.25, 0.5, 0.75])
        ref_sizes.append(kr)
        med.append(float(q50))
        low.append(float(q25))
        high.append(float(q75))
    resolution = 1.0 / (plan.permutations + 1) if plan.test != "welch" else 0.0
    return SizeCurve(
        tuple(sizes),
        tuple(ref_sizes),
        tuple(med),
        tuple(low),
        tuple(high),
        repeats,
        smallest_size(sizes, med),
        resolution,
    )
