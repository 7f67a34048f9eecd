"""CLiD_th (Zhai et al., NeurIPS 2024): the CLiD signal's two terms robust-scaled on shadow rows
and weighted by an α chosen on the shadows, one threshold. Higher score = member.

    x, y, xt, yt, ids, names = plan.matrices(["clid"])   # shadow rows, then target rows
    choice = fit_clid_threshold(x, y, names)
    target_scores = choice.scores(xt, names)              # (S_target,), >= choice.threshold: member

As the reference code (github zhaisf/CLiD, `cal_clid_th.py`): the two terms per sample are the
conditional loss L = `clid/loss_cond` and the CLiD term -D (D = `clid/score`, the mean gap over
the reduced and null captions; lower = member for both); a `RobustScaler` (median, interquartile
range 25-75) is fitted on every shadow row, members and non-members together, and applied to the
shadow and target rows alike; M = (1 - α)·RS(L) + α·RS(-D) for α in 0, 0.1, ..., 1, and the α of
the highest shadow AUC is kept (the first on ties, as the reference's strict `>`). We return -M
(higher = member, the package's convention) and the balanced-accuracy-maximising threshold on
the shadow scores (the reference's best-ASR threshold, applied unchanged to the target; the two
coincide with equal classes). Deviations: the AUC that picks α is the exact one (the reference
integrates a 2,000-threshold grid), and the reader of TPR@FPR stays the package's
(`lightning_mia.metrics`: the largest FPR strictly below the budget; the reference reads TPR at
the first ROC point with FPR >= 1%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_mia.metrics import roc_auc, threshold_from
from lightning_mia.specs.attacks import AttackError

CLID_LOSS = "clid/loss_cond"  # L: conditional denoising loss, lower = member
CLID_DISCREPANCY = "clid/score"  # D: mean likelihood gap, higher = member
CLID_FEATURES = (CLID_LOSS, CLID_DISCREPANCY)
ALPHAS = tuple(i / 10 for i in range(11))  # the reference's grid of α
QUANTILE_RANGE = (0.25, 0.75)  # sklearn RobustScaler's default


def robust_scaler(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, scale) (F,) of rows x (S, F): median and interquartile range of each column,
    a zero range replaced by 1 (as scikit-learn's `RobustScaler`, linear quantiles)."""
    q = torch.tensor([QUANTILE_RANGE[0], 0.5, QUANTILE_RANGE[1]], dtype=torch.float64)
    low, median, high = torch.quantile(x.double(), q, dim=0)  # (F,) each
    scale = high - low
    return median, torch.where(scale == 0, torch.ones_like(scale), scale)


def _terms(x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
    """(S, 2) [L, -D] of rows x (S, F) whose columns are `names`: lower = member for both."""
    missing = [f for f in CLID_FEATURES if f not in names]
    if missing:
        raise AttackError(
            f"CLiD_th needs features {list(CLID_FEATURES)}; missing {missing} "
            "(query the models with the `clid` gray-box signal)"
        )
    cols = [list(names).index(f) for f in CLID_FEATURES]
    terms = x[:, cols].double()
    return terms * torch.tensor([1.0, -1.0], dtype=terms.dtype)


@dataclass(frozen=True)
class CLiDThreshold:
    """CLiD_th fitted on shadow rows: its scaler, α and threshold; `scores` applies it."""

    alpha: float  # weight of the CLiD term (1 - alpha on the loss)
    center: tuple[float, float]  # shadow medians of [L, -D]
    scale: tuple[float, float]  # shadow interquartile ranges of [L, -D]
    threshold: float  # on `scores`: >= threshold -> member
    shadow_auc: float  # AUC of `scores` on the shadow rows at this alpha

    def scores(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """-M (S,) float64 of rows x (S, F) whose columns are `names`: higher = member."""
        return _combined(_terms(x, names), self.center, self.scale, self.alpha)

    def to_dict(self) -> dict:
        return {
            "features": list(CLID_FEATURES),
            "alpha": self.alpha,
            "center": list(self.center),
            "scale": list(self.scale),
            "threshold": self.threshold,
            "shadow_auc": self.shadow_auc,
        }


def _combined(
    terms: torch.Tensor, center: Sequence[float], scale: Sequence[float], alpha: float
) -> torch.Tensor:
    """-M (S,) of terms (S, 2) [L, -D]: minus the α-weighted sum of the scaled terms."""
    shift, unit = (torch.tensor(v, dtype=terms.dtype) for v in (center, scale))
    scaled = (terms - shift) / unit  # (S, 2)
    return -((1 - alpha) * scaled[:, 0] + alpha * scaled[:, 1])


def fit_clid_threshold(
    x: torch.Tensor, y: torch.Tensor, names: Sequence[str], alphas: Sequence[float] = ALPHAS
) -> CLiDThreshold:
    """CLiD_th on shadow rows x (S, F) (columns `names`, among them `CLID_FEATURES`) with
    membership y (S,): the robust scaler, the α of the best shadow AUC, the shadow threshold."""
    labels = y.bool()
    if int(labels.sum()) == 0 or int((~labels).sum()) == 0:
        raise AttackError(
            f"CLiD_th needs shadow members and non-members; got {int(labels.sum())} members "
            f"and {int((~labels).sum())} non-members"
        )
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise AttackError(f"CLiD_th alphas must be a non-empty list in [0, 1], got {list(alphas)}")
    terms = _terms(x, names)  # (S, 2)
    center, scale = (tuple(float(v) for v in t) for t in robust_scaler(terms))
    best_alpha, best_auc = alphas[0], -1.0
    for alpha in alphas:
        auc = float(roc_auc(_combined(terms, center, scale, alpha), labels))
        if auc > best_auc:
            best_alpha, best_auc = alpha, auc
    shadow_scores = _combined(terms, center, scale, best_alpha)
    threshold = threshold_from(shadow_scores, labels)
    return CLiDThreshold(float(best_alpha), center, scale, threshold, best_auc)
