"""Baselines reported beside every attack (ATTACKS.md).

- `threshold`: one feature, one cut. For each feature the direction (sign) and the threshold
  are chosen on the training (shadow) rows only; the feature with the best training AUC is the
  baseline, applied unchanged to the target. Target labels are never looked at.
- `blind`: the same AttackModule as the attacks, over the `blind/*` features alone (query image
  and caption, no model output), cross-validated on the target's own rows
  (`lightning_mia.attack.blind`): a diagnostic of the benchmark. A high blind score means
  members and non-members differ in distribution, and every attack's figures are inflated by as
  much.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_mia.metrics import roc_auc, threshold_from


@dataclass(frozen=True)
class ThresholdChoice:
    """A single-feature rule `direction * feature >= threshold` -> member, fitted on shadows."""

    feature: str
    direction: int  # +1: larger values mean member; -1: smaller values do
    threshold: float  # on direction * feature
    train_auc: float  # AUC of direction * feature on the rows it was chosen on (>= 0.5)

    def scores(self, x: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Signed scores (S,) of rows x (S, F) whose columns are `names`."""
        return self.direction * x[:, list(names).index(self.feature)].double()

    def to_dict(self) -> dict:
        return {
            "feature": self.feature,
            "direction": self.direction,
            "threshold": self.threshold,
            "train_auc": self.train_auc,
        }


def fit_feature_threshold(values: torch.Tensor, labels: torch.Tensor, name: str) -> ThresholdChoice:
    """Direction and balanced-accuracy-maximising threshold of one feature on training rows."""
    auc = float(roc_auc(values, labels))
    direction = 1 if auc >= 0.5 else -1
    signed = direction * values.double()
    return ThresholdChoice(name, direction, threshold_from(signed, labels), max(auc, 1.0 - auc))


def fit_threshold_baseline(
    x: torch.Tensor, y: torch.Tensor, names: Sequence[str]
) -> list[ThresholdChoice]:
    """One rule per feature column of x (S, F), best training AUC first (ties: by name)."""
    if x.shape[1] != len(names) or x.shape[1] == 0:
        raise ValueError(f"{x.shape[1]} feature columns for {len(names)} names")
    labels = y.bool()
    choices = [fit_feature_threshold(x[:, j], labels, n) for j, n in enumerate(names)]
    return sorted(choices, key=lambda c: (-c.train_auc, c.feature))
