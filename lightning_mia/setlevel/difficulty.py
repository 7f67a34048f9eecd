"""Each tested sample's difficulty, from the shadow models' queries of it, and whether the
aggregation learns membership at all: the two checks `audit.dataset_inference` adds to its test.

    ms, mr = difficulty_means("shadow", calibration, names, suspect, reference)  # or a str: why not
    weights = difficulty_weights(np.concatenate([xs, xr]), np.concatenate([ms, mr]))
    auc, p = shadow_transfer(names, shadows, l2=1.0, components=8)

Why and what they assume: `lightning_mia.setlevel.audit`'s docstring, steps 2-3.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import norm

from lightning_mia.setlevel.rows import FeatureRows
from lightning_mia.setlevel.scorer import fit_scorer
from lightning_mia.setlevel.stats import auc_greater


def difficulty_means(
    aggregation: str,
    calibration: Sequence[FeatureRows],
    names: Sequence[str],
    *tested: FeatureRows,
) -> list[np.ndarray] | str:
    """Per set of `tested`, (n, F) each sample's mean of `names` over the shadows that did
    not train on it (`out_mean`); or why the shadows' queries cannot calibrate them: not the
    `shadow` aggregation (a held-out fit would need calibrated rows of its own; not built), a
    sample not queried on every shadow, or without an OUT query, or a feature missing or not
    finite there."""
    if aggregation != "shadow":
        return f"it is applied with the shadow aggregation only, not {aggregation!r}"
    if not calibration:
        return "no shadow model was queried on the tested samples"
    for cal in calibration:
        have = set(cal.sample_id.tolist())
        for rows in tested:
            lacking = [int(i) for i in rows.sample_id if int(i) not in have]
            if lacking:
                return (
                    f"{cal.name} has no rows for {len(lacking)} samples of the {rows.name}, "
                    f"e.g. {sorted(lacking)[:5]}"
                )
    means = []
    for rows in tested:
        picked = difficulty_rows(calibration, rows)
        out = np.stack([_out_mask(c) for c in picked])  # (M, n)
        if not out.any(axis=0).all():
            ids = rows.sample_id[~out.any(axis=0)].tolist()
            return f"every shadow trained on {len(ids)} samples of the {rows.name}, e.g. {ids[:5]}"
        missing = [n for n in names if any(n not in c.features for c in picked)]
        if missing:
            return f"the shadows' queries lack features {missing[:5]}"
        finite = [np.isfinite(c.matrix(names)[o]).all(axis=0) for c, o in zip(picked, out)]
        bad = [n for n, ok in zip(names, np.all(finite, axis=0)) if not ok]
        if bad:
            return f"features not finite in the shadows' queries of the {rows.name}: {bad[:5]}"
        means.append(_mean_out(picked, names))
    return means


def _out_mask(rows: FeatureRows) -> np.ndarray:
    """(n,) the rows whose model did not train on the sample (all, where unknown)."""
    return np.ones(len(rows), bool) if rows.is_member is None else ~rows.is_member.astype(bool)


def difficulty_rows(calibration: Sequence[FeatureRows], rows: FeatureRows) -> list[FeatureRows]:
    """Each calibration table's rows of the samples of `rows`, in their order."""
    return [c.select(rows.sample_id, f"{c.name} on the {rows.name}") for c in calibration]


def _mean_out(picked: Sequence[FeatureRows], names: Sequence[str]) -> np.ndarray:
    """(n, F) the mean of `names` over the OUT rows of each sample (rows aligned by sample)."""
    out = np.stack([_out_mask(c) for c in picked]).astype(np.float64)[:, :, None]  # (M, n, 1)
    x = np.stack([np.where(o > 0, c.matrix(names), 0.0) for c, o in zip(picked, out)])
    return (out * x).sum(axis=0) / out.sum(axis=0)


def out_mean(
    calibration: Sequence[FeatureRows], rows: FeatureRows, names: Sequence[str]
) -> np.ndarray:
    """(n, F) per sample of `rows`, the mean of `names` over the shadows that did not train on
    it (OUT queries; whether a shadow trained on a sample never depends on S or R)."""
    return _mean_out(difficulty_rows(calibration, rows), names)


def difficulty_weights(target: np.ndarray, shadow_mean: np.ndarray) -> np.ndarray:
    """(F,) per feature, the least-squares slope of the target's feature on the shadows' mean
    feature of the same sample, over the suspect and reference rows together (`target` and
    `shadow_mean` (n, F)): how much of the feature the sample's difficulty explains. The
    calibrated feature `target - weight * shadow_mean` is then the one of least variance (a
    control variate): a feature the shadows reproduce sample by sample (a loss) loses its
    difficulty, one they do not (a generated image's semantics) is left nearly as it is,
    where plain subtraction would add the shadows' own noise to it. No label enters, and the
    fit is symmetric in the two sets, so they stay exchangeable when the suspect set was not
    used. A feature whose shadow mean is the same for every sample gets weight 0."""
    t = target - target.mean(axis=0)
    m = shadow_mean - shadow_mean.mean(axis=0)
    varying = np.ptp(shadow_mean, axis=0) > 0  # exact: round-off in `m` must not count
    spread = np.where(varying, (m * m).sum(axis=0), 1.0)
    return np.where(varying, (m * t).sum(axis=0) / spread, 0.0)


def shadow_transfer(
    names: Sequence[str], shadows: Sequence[FeatureRows], l2: float = 1.0, components: int = 8
) -> tuple[float, float] | None:
    """How well the aggregation learns membership at all: each shadow's rows scored by the
    aggregation fitted on the other shadows; (AUC of its members above its non-members, over
    the shadows, weighted by their pairs; one-sided p of a stratified Mann-Whitney test: each
    shadow's U minus its null mean, summed, over the root of the summed null variances, ties
    ignored, which makes it slightly conservative), or None with fewer than 2 shadows. It
    checks the score on raw shadow rows (the shadows' own rows have no calibration queries).
    An AUC not significantly above 0.5 is no evidence that the score learns membership from
    the shadows, and a "not detected" then says little about the suspect set."""
    if len(shadows) < 2:
        return None
    excess, variance, pairs = 0.0, 0.0, 0.0
    for k, held in enumerate(shadows):
        rest = [s for j, s in enumerate(shadows) if j != k]
        x = np.concatenate([s.matrix(names) for s in rest])
        y = np.concatenate([s.is_member for s in rest]).astype(np.float64)
        scorer = fit_scorer(x, y, names, l2, components)
        scores = scorer.score(held.matrix(names))
        n1, n0 = int(held.is_member.sum()), int((~held.is_member).sum())
        auc = auc_greater(scores[held.is_member], scores[~held.is_member])
        excess += (auc - 0.5) * n1 * n0  # U - E[U] under "no membership signal"
        variance += n1 * n0 * (n1 + n0 + 1) / 12.0
        pairs += n1 * n0
    return 0.5 + excess / pairs, float(norm.sf(excess / np.sqrt(variance)))
