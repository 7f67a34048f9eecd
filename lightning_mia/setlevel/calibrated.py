"""The set-level audit's second test: per-sample scores calibrated by reference models.

    test = calibrated_scores_test({"lira-offline-loss": (ids, scores), ...}, suspect, reference)
    test.p_value, test.best, test.rows["lira-offline-loss"]

The main test (`audit.py`) learns one linear score over raw features, so the per-sample
difficulty of each image (some are easy to denoise whether seen or not) stays in its variance.
LiRA-calibrated attack scores (`attack/calibration.py`: each sample's score against the
distribution of the shadow models' scores of the same sample, which never trained on it) remove
that difficulty; on the onset points they separate a member set from its non-members with
p-values orders of magnitude below the main test's (seq2seq, 20 steps per image with crop and
flip: 9e-10 against 0.044; README, "set-level audit").

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
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

CALIBRATED_PREFIX = "lira-"  # the report rows calibrated by reference (shadow) models


@dataclass(frozen=True)
class CalibratedTest:
    """Bonferroni's p-value over calibrated rows, each a one-sided Mann-Whitney test."""

    p_value: float
    best: str  # the row with the smallest p-value
    rows: dict[str, float]  # row -> its own one-sided p-value
    auc: float  # the best row's AUC of suspect against reference scores
    suspect_n: int
    reference_n: int

    def detected(self, alpha: float) -> bool:
        return self.p_value < alpha

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibratedTest:
        return cls(**{**d, "rows": dict(d["rows"])})


def calibrated_scores_test(
    rows: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    suspect_ids: Sequence[int],
    reference_ids: Sequence[int],
) -> CalibratedTest | None:
    """The test over `rows` (name -> (sample ids, scores), higher = member) whose names start
    with `CALIBRATED_PREFIX`; None when no such row scores samples of both sets. A row's
    samples outside S and R, or with a non-finite score, are left out."""
    suspect, reference = set(map(int, suspect_ids)), set(map(int, reference_ids))
    p_values, aucs, sizes = {}, {}, {}
    for name, (ids, scores) in rows.items():
        if not name.startswith(CALIBRATED_PREFIX):
            continue
        values = dict(zip(map(int, ids), map(float, scores)))
        s = np.array([v for i, v in values.items() if i in suspect and np.isfinite(v)])
        r = np.array([v for i, v in values.items() if i in reference and np.isfinite(v)])
        if len(s) == 0 or len(r) == 0:
            continue
        test = mannwhitneyu(s, r, alternative="greater")
        p_values[name] = float(test.pvalue)
        aucs[name] = float(test.statistic) / (len(s) * len(r))
        sizes[name] = (len(s), len(r))
    if not p_values:
        return None
    best = min(p_values, key=p_values.get)
    return CalibratedTest(
        p_value=min(1.0, p_values[best] * len(p_values)),
        best=best,
        rows=p_values,
        auc=aucs[best],
        suspect_n=sizes[best][0],
        reference_n=sizes[best][1],
    )
