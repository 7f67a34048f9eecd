"""Complexity calibration: a reconstruction error normalised by the query image's own
complexity, fitted on the training (shadow) rows. No query beyond the attack's own.

    results, notes = complexity_results(plan, ["pixel", "loss", "secmi", "pia"], costs, 0, 1000)
    results["loss-cc"].details  # {"calibrates": "loss/mean", "by": "complexity/png_bpp", ...}

For an attack that declares a complexity group (`AttackSpec.calibrated_by`, e.g. `loss`,
`secmi`, `pia`, `pixel`, `nll`), the row `<attack>-cc` scores each sample by the residual

    r = z - (a + β · log c),      z = the attack's score on its scale (`AttackSpec.score_scale`:
                                      log of a loss, PSNR as it is), c = a complexity feature

where a and β are the least-squares fit of z on log c over the training rows' *non-members* (how
an error grows with complexity when the model has not seen the image; never a target label).
β = 1 on a log-scale error is the plain ratio error / complexity (FreMIA's and the compressed-size
normalisation's form); fitting β lets the data say how much of the error the measure explains.
Among the complexity features (`features/complexity.py`: high-pass energy, PNG bits per pixel)
the one whose residual separates the training rows best (AUC) is kept; its direction and
thresholds are chosen there too (balanced accuracy for the report, FPR < 1% for the deployed
cut). Where this differs from the papers it follows: FreMIA (ICML 2026) low-pass filters the
reconstruction error itself before comparing it, while this row divides (on the log scale:
subtracts) a measure of the query image's high-frequency content from the whole error; the
compressed-size normalisation of rectified-flow MIA is followed in its form (error over PNG bits
per pixel), with β fitted instead of fixed at 1. The option lives here, as a calibrated variant
row beside the raw attack and its LiRA rows, so the raw score stays in the report to compare
with; it is reported whenever the shards hold both the score and a complexity feature.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_mia.attack.calibration import to_scale
from lightning_mia.attack.report import AttackResult, Realised
from lightning_mia.metrics import roc_auc, threshold_from
from lightning_mia.specs.attacks import ATTACKS, AttackSpec, QueryCosts

SUFFIX = "-cc"  # the row of an attack's complexity-calibrated score
CHOSEN_ON = "training rows"  # the shadows' rows in the shadow setting


@dataclass(frozen=True)
class ComplexityFit:
    """z - (intercept + beta · log c), signed by `direction`; fitted on training rows."""

    feature: str  # the attack's score
    scale: str  # its scale
    by: str  # the complexity feature c
    intercept: float
    beta: float
    direction: int  # +1: larger residual = member
    train_auc: float  # AUC of the signed residual on the training rows

    def scores(self, rows: Any) -> torch.Tensor:
        """Signed residuals (S,) float64 of `rows` (an `attack.data.Rows`)."""
        z = to_scale(rows.features[self.feature], self.scale)
        logc = rows.features[self.by].double().clamp(min=1e-12).log()
        return self.direction * (z - self.intercept - self.beta * logc)

    def to_dict(self) -> dict:
        return {
            "calibrates": self.feature,
            "scale": self.scale,
            "by": self.by,
            "intercept": self.intercept,
            "beta": self.beta,
            "direction": self.direction,
            "train_auc": self.train_auc,
            "fitted_on": "training rows' non-members (least squares of z on log c)",
        }


def fit_complexity(rows: Any, feature: str, scale: str, by: str) -> ComplexityFit:
    """Least squares of the scaled `feature` on log(`by`) over the non-member rows, direction
    and AUC of the residual over all rows."""
    z = to_scale(rows.features[feature], scale)  # (S,)
    logc = rows.features[by].double().clamp(min=1e-12).log()  # (S,)
    out = ~rows.is_member
    design = torch.stack([torch.ones_like(logc[out]), logc[out]], dim=1)  # (S_out, 2)
    coef = torch.linalg.lstsq(design, z[out][:, None]).solution[:, 0]  # (2,): a, β
    resid = z - coef[0] - coef[1] * logc
    auc = float(roc_auc(resid, rows.is_member))
    sign = 1 if auc >= 0.5 else -1
    return ComplexityFit(
        feature, scale, by, float(coef[0]), float(coef[1]), sign, max(auc, 1 - auc)
    )


def _candidates(spec: AttackSpec, plan: Any) -> list[str]:
    """Complexity features usable in the training and test rows, sorted."""
    prefixes = tuple(f"{g}/" for g in spec.calibrated_by)
    names = [n for n in plan.train.features if n.startswith(prefixes)]
    return sorted(
        n
        for n in names
        if n in plan.test.features
        and not plan.train.problems.get(n)
        and not plan.test.problems.get(n)
    )


def _calibrated(
    spec: AttackSpec, plan: Any, by: Sequence[str], costs: QueryCosts, seed: int, n_boot: int
) -> AttackResult:
    fits = [fit_complexity(plan.train, spec.score_feature, spec.score_scale, c) for c in by]
    best = max(fits, key=lambda f: f.train_auc)  # the first on ties
    train, test = best.scores(plan.train), best.scores(plan.test)
    y, yt = plan.train.is_member, plan.test.is_member
    threshold = threshold_from(train, y)
    details = {**best.to_dict(), "threshold": threshold, "candidates": list(by)}
    return AttackResult.from_scores(
        spec,
        test,
        yt,
        plan.test.sample_id,
        [spec.score_feature, best.by],
        threshold,
        costs,
        seed,
        n_boot,
        measured=False,
        details=details,
        row=spec.name + SUFFIX,
        statistic="calibrated",
        realised=Realised.chosen((train, y), (test, yt), CHOSEN_ON),
    )


def complexity_results(
    plan: Any, names: Sequence[str], costs: QueryCosts, seed: int, n_boot: int
) -> tuple[dict[str, AttackResult], list[str]]:
    """`<attack>-cc` of every attack among `names` that declares a complexity group, and a note
    naming those whose shards lack what they need."""
    results, lacking = {}, []
    for name in names:
        spec = ATTACKS[name]
        if not spec.calibrated_by or not spec.score_feature:
            continue
        score_ok = all(
            spec.score_feature in r.features and not r.problems.get(spec.score_feature)
            for r in (plan.train, plan.test)
        )
        by = _candidates(spec, plan)
        if score_ok and by:
            results[name + SUFFIX] = _calibrated(spec, plan, by, costs, seed, n_boot)
        else:
            lacking.append(
                f"{name}{SUFFIX} ({'no complexity features' if score_ok else 'no score'})"
            )
    notes = []
    if lacking:
        notes.append(
            "complexity-calibrated rows not reported: " + ", ".join(lacking) + "; the query "
            "computes the `complexity` group since it exists: query again to get them"
        )
    return results, notes
