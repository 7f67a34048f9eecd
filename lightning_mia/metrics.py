"""Membership-inference metrics: pure tensor functions, bootstrap intervals, one `evaluate`.

Score convention: higher = more likely a member; `labels` are 1/True for members. A threshold
`t` admits (predicts "member" for) every sample with `score >= t`, so tied scores are always
admitted together.

Every metric takes optional resampling `weights` (B, S): how many times each sample is drawn in
each of B bootstrap resamples. With weights it returns (B,) values, without a 0-d tensor. That
is what makes `bootstrap_interval` fast (1,000 resamples of 10k scores in about a second): no
resample is materialised, all are evaluated at once from one sort of the scores.

We compute the ROC ourselves rather than with torchmetrics' `binary_roc`/`binary_auroc`: those
squash scores outside [0, 1] through a sigmoid, which saturates in float32 and turns distinct
raw scores (PSNR, logits > 17) into ties, exactly where TPR at low FPR is read.

    TPR@FPR: read at the lowest threshold whose FPR is strictly below the budget, i.e. the ROC
    point with the largest FPR < budget (never the nearest FPR, never interpolated), as the
    strictest references read it (Carlini et al.'s LiRA `plot.py`: `tpr[np.where(fpr < .001)
    [0][-1]]`; PIA's `stable_attack.py`: `(fpr < 0.01).sum() - 1`); `strict=False` reads the
    largest FPR <= budget instead. The number of false positives admitted there is reported
    beside it (`false_positives_at_fpr`): with 1,000 non-members TPR@0.1%FPR admits none.

Accuracy is balanced accuracy (the mean of TPR and TNR at the threshold) when the classes are
unequal; with equal classes the two are the same number. `threshold_from` maximises balanced
accuracy on the fitting rows for that reason (the same cut as accuracy with equal classes).
`threshold_at_fpr` picks the cut deployed for an FPR budget, `rates_at` reads what it gives.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

METRIC_NAMES = ("accuracy", "auc", "tpr@1%fpr", "tpr@0.1%fpr")
FPR_BUDGETS = {"tpr@1%fpr": 0.01, "tpr@0.1%fpr": 0.001}
_BOOT_CHUNK = 128  # resamples evaluated at once: bounds memory at ~CHUNK x S float64
_EPS = 1e-9


@dataclass(frozen=True)
class Metric:
    """A metric value with its bootstrap 95% interval; `value` is None when not resolvable.

    `false_positives`: for a TPR@FPR, the non-members admitted at the ROC point read (None for
    the other metrics, and left out of their JSON).
    """

    value: float | None
    low: float | None = None
    high: float | None = None
    resolvable: bool = True
    false_positives: int | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.false_positives is None:
            del d["false_positives"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Metric:
        return cls(
            d.get("value"),
            d.get("low"),
            d.get("high"),
            bool(d.get("resolvable", True)),
            d.get("false_positives"),
        )

    def format(self, digits: int = 3) -> str:
        """`0.912 [0.890, 0.931]` (`... (1 FP)` for a TPR@FPR), or `n/r` when not resolvable."""
        if not self.resolvable or self.value is None:
            return "n/r"
        text = f"{self.value:.{digits}f}"
        if self.low is not None and self.high is not None:
            text += f" [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        if self.false_positives is not None:
            text += f" ({self.false_positives} FP)"
        return text


def _check(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.as_tensor(scores).detach().reshape(-1).to("cpu", torch.float64)
    labels = torch.as_tensor(labels).detach().reshape(-1).to("cpu").bool()
    if scores.numel() != labels.numel():
        raise ValueError(f"{scores.numel()} scores for {labels.numel()} labels")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    return scores, labels


def _weights(labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return torch.ones(1, labels.numel(), dtype=torch.float64)
    return weights.to(torch.float64).reshape(-1, labels.numel())


def _per_value(
    scores: torch.Tensor, labels: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Distinct scores ascending (U,) and member / non-member weight at each, (B, U) each."""
    values, inv = torch.unique(scores, sorted=True, return_inverse=True)
    pos = torch.zeros(w.shape[0], values.numel(), dtype=torch.float64)
    neg = torch.zeros_like(pos)
    pos.index_add_(1, inv[labels], w[:, labels])
    neg.index_add_(1, inv[~labels], w[:, ~labels])
    return values, pos, neg


def _squeeze(out: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return out[0] if weights is None else out


def roc_auc(
    scores: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Area under the ROC curve (ties count one half), as scikit-learn's `roc_auc_score`."""
    scores, labels = _check(scores, labels)
    w = _weights(labels, weights)
    _, pos, neg = _per_value(scores, labels, w)  # (B, U)
    below = torch.cumsum(neg, dim=1) - neg  # non-member weight strictly below each value
    hits = (pos * (below + 0.5 * neg)).sum(1)
    return _squeeze(hits / (pos.sum(1) * neg.sum(1)), weights)


def roc_curve(
    scores: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fpr, tpr, thresholds), one point per distinct score, descending thresholds from +inf.

    Equals scikit-learn's `roc_curve(labels, scores, drop_intermediate=False)`.
    """
    scores, labels = _check(scores, labels)
    values, pos, neg = _per_value(scores, labels, _weights(labels, None))
    tp = torch.flip(torch.cumsum(torch.flip(pos[0], [0]), 0), [0])  # admitted at each value
    fp = torch.flip(torch.cumsum(torch.flip(neg[0], [0]), 0), [0])
    zero = torch.zeros(1, dtype=torch.float64)
    tpr = torch.cat([zero, torch.flip(tp, [0]) / max(int(labels.sum()), 1)])
    fpr = torch.cat([zero, torch.flip(fp, [0]) / max(int((~labels).sum()), 1)])
    thresholds = torch.cat([torch.tensor([math.inf], dtype=torch.float64), torch.flip(values, [0])])
    return fpr, tpr, thresholds


def is_resolvable(labels: torch.Tensor, fpr_budget: float) -> bool:
    """TPR@FPR needs at least 1/budget non-members, or the budget admits no false positive.

    (At exactly 1/budget non-members the strict reading admits none: the FP count says so.)"""
    num_negative = int((~torch.as_tensor(labels).reshape(-1).bool()).sum())
    return num_negative * fpr_budget >= 1.0 - _EPS


def allowed_false_positives(
    num_negative: torch.Tensor, fpr_budget: float, strict: bool = True
) -> torch.Tensor:
    """The most non-member weight a threshold may admit: FP < budget x N (strict), else <=."""
    if strict:
        return torch.ceil(fpr_budget * num_negative - _EPS) - 1
    return torch.floor(fpr_budget * num_negative + _EPS)


def _read_at_budget(
    pos: torch.Tensor, neg: torch.Tensor, fpr_budget: float, strict: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(TP, FP, number of admitted distinct scores) (B,) at the lowest threshold whose FPR is
    within the budget, from the member / non-member weight per distinct score (B, U), ascending."""
    # Cumulated from the highest score down: admitted weight as the threshold is lowered.
    tp = torch.cumsum(torch.flip(pos, [1]), 1)  # (B, U), non-decreasing
    fp = torch.cumsum(torch.flip(neg, [1]), 1)
    allowed = allowed_false_positives(neg.sum(1, keepdim=True), fpr_budget, strict)  # (B, 1)
    count = torch.searchsorted(fp.contiguous(), allowed, right=True)  # thresholds with fp<=allowed
    at = (count - 1).clamp(min=0)
    zero = torch.zeros_like(allowed)
    tp_at = torch.where(count > 0, tp.gather(1, at), zero)[:, 0]
    fp_at = torch.where(count > 0, fp.gather(1, at), zero)[:, 0]
    return tp_at, fp_at, count[:, 0]


def tpr_at_fpr(
    scores: torch.Tensor,
    labels: torch.Tensor,
    fpr_budget: float,
    weights: torch.Tensor | None = None,
    strict: bool = True,
) -> torch.Tensor:
    """TPR at the lowest threshold whose FPR is < `fpr_budget` (<= if not `strict`); NaN when
    not resolvable.

    Thresholds are the distinct scores (a threshold admits all samples with score >= it), so
    the ROC point read is the one with the largest FPR below the budget.
    """
    scores, labels = _check(scores, labels)
    w = _weights(labels, weights)
    if not is_resolvable(labels, fpr_budget):
        return _squeeze(torch.full((w.shape[0],), math.nan, dtype=torch.float64), weights)
    _, pos, neg = _per_value(scores, labels, w)
    tp_at = _read_at_budget(pos, neg, fpr_budget, strict)[0]
    return _squeeze((tp_at / pos.sum(1)).to(torch.float64), weights)


def false_positives_at_fpr(
    scores: torch.Tensor, labels: torch.Tensor, fpr_budget: float, strict: bool = True
) -> int:
    """Non-members admitted at the ROC point `tpr_at_fpr` reads (below budget x non-members);
    -1 when not resolvable."""
    scores, labels = _check(scores, labels)
    if not is_resolvable(labels, fpr_budget):
        return -1
    _, pos, neg = _per_value(scores, labels, _weights(labels, None))
    return int(round(float(_read_at_budget(pos, neg, fpr_budget, strict)[1][0])))


def threshold_at_fpr(
    scores: torch.Tensor, labels: torch.Tensor, fpr_budget: float, strict: bool = True
) -> float:
    """The cut (admit `score >= cut`) of the ROC point `tpr_at_fpr` reads on these (shadow)
    rows: the lowest distinct score whose FPR is within the budget, +inf if none is.

    What an attacker deploys for an FPR budget (`rates_at`: what it gives on the target); with
    few non-members it admits none of them.
    """
    scores, labels = _check(scores, labels)
    values, pos, neg = _per_value(scores, labels, _weights(labels, None))
    count = int(_read_at_budget(pos, neg, fpr_budget, strict)[2][0])
    return float(torch.flip(values, [0])[count - 1]) if count > 0 else math.inf


def rates_at(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict[str, float]:
    """What `score >= threshold` -> member gives: fpr, tpr, false_positives, true_positives,
    non_members, members (counts as floats, rates NaN where a class is empty)."""
    scores, labels = _check(scores, labels)
    admitted = scores >= threshold
    fp, tp = int((admitted & ~labels).sum()), int((admitted & labels).sum())
    neg, pos = int((~labels).sum()), int(labels.sum())
    return {
        "fpr": fp / neg if neg else math.nan,
        "tpr": tp / pos if pos else math.nan,
        "false_positives": fp,
        "true_positives": tp,
        "non_members": neg,
        "members": pos,
    }


def accuracy(
    scores: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fraction of samples classified right by `score >= threshold` -> member."""
    scores, labels = _check(scores, labels)
    w = _weights(labels, weights)
    correct = ((scores >= threshold) == labels).to(torch.float64)  # (S,)
    return _squeeze((w * correct).sum(1) / w.sum(1), weights)


def balanced_accuracy(
    scores: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of TPR and TNR of `score >= threshold` -> member (scikit-learn's
    `balanced_accuracy_score`); equals `accuracy` when the classes are equal in size."""
    scores, labels = _check(scores, labels)
    w = _weights(labels, weights)
    admitted = (scores >= threshold).to(torch.float64)  # (S,)
    tpr = (w[:, labels] * admitted[labels]).sum(1) / w[:, labels].sum(1)
    tnr = (w[:, ~labels] * (1 - admitted[~labels])).sum(1) / w[:, ~labels].sum(1)
    return _squeeze(0.5 * (tpr + tnr), weights)


def threshold_from(scores: torch.Tensor, labels: torch.Tensor, balanced: bool = True) -> float:
    """The balanced-accuracy-maximising threshold on (training/shadow) data, never on test
    labels (`balanced=False`: plain accuracy). With equal classes the two choose the same cut.

    Returned as the midpoint between the lowest admitted distinct score and the next lower one,
    so it classifies the fitting data exactly as the chosen cut and generalises symmetrically.
    """
    scores, labels = _check(scores, labels)
    values, pos, neg = _per_value(scores, labels, _weights(labels, None))
    pos, neg = pos[0], neg[0]  # (U,)
    if balanced:  # each class weighs one half: TPR + TNR
        pos, neg = pos / pos.sum().clamp(min=1), neg / neg.sum().clamp(min=1)
    tp = torch.flip(torch.cumsum(torch.flip(pos, [0]), 0), [0])  # admitted at threshold values[k]
    tn = torch.cumsum(neg, 0) - neg  # rejected: strictly below values[k]
    correct = torch.cat([tp + tn, neg.sum().reshape(1)])  # last candidate: admit nothing
    k = int(torch.argmax(correct))
    if k == values.numel():
        return math.nextafter(float(values[-1]), math.inf)
    if k == 0:
        return float(values[0])
    mid = 0.5 * (float(values[k - 1]) + float(values[k]))
    return mid if mid > float(values[k - 1]) else float(values[k])


@functools.lru_cache(maxsize=4)
def _resamples(labels: tuple[bool, ...], n_boot: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Stratified resampling counts of `bootstrap_interval` in chunks of (<= _BOOT_CHUNK, S),
    members and non-members drawn separately; drawn once per labels and seed (every metric and
    row of a report shares them), read only."""
    y, gen, chunks = torch.tensor(labels), torch.Generator().manual_seed(seed), []
    for start in range(0, n_boot, _BOOT_CHUNK):
        counts = torch.zeros(min(_BOOT_CHUNK, n_boot - start), y.numel(), dtype=torch.float64)
        for idx in (torch.nonzero(y).reshape(-1), torch.nonzero(~y).reshape(-1)):
            if idx.numel():
                draws = torch.randint(0, idx.numel(), (len(counts), idx.numel()), generator=gen)
                counts.scatter_add_(1, idx[draws], torch.ones(draws.shape, dtype=torch.float64))
        chunks.append(counts)
    return tuple(chunks)


def _accepts_weights(fn: Callable) -> bool:
    try:
        return "weights" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def bootstrap_interval(
    metric_fn: Callable[..., torch.Tensor],
    scores: torch.Tensor,
    labels: torch.Tensor,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile interval of `metric_fn(scores, labels)` over stratified bootstrap resamples.

    `metric_fn` taking a `weights` argument (every metric here, or a `functools.partial` of one)
    is evaluated on all resamples at once; any other callable is called once per resample.
    Returns (nan, nan) when the metric is undefined (NaN) on every resample.
    """
    scores, labels = _check(scores, labels)
    values = []
    for w in _resamples(tuple(labels.tolist()), n_boot, seed):
        if _accepts_weights(metric_fn):
            values.append(
                torch.as_tensor(metric_fn(scores, labels, weights=w), dtype=torch.float64)
            )
            continue
        for row in w.long():
            idx = torch.repeat_interleave(torch.arange(labels.numel()), row)
            values.append(torch.as_tensor(metric_fn(scores[idx], labels[idx])).reshape(1))
    boot = torch.cat(values).to(torch.float64)
    boot = boot[torch.isfinite(boot)]
    if boot.numel() == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2
    low, high = torch.quantile(boot, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(low), float(high)


def evaluate(
    scores: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Metric]:
    """Accuracy at `threshold`, ROC-AUC, TPR@1%FPR and TPR@0.1%FPR, each with a 95% interval.

    Accuracy is balanced accuracy when members and non-members are unequal in number. Each
    TPR@FPR is read strictly below its budget (`tpr_at_fpr`) and carries the false positives it
    admits. All four use the same bootstrap resamples
    (same seed). A TPR@FPR with fewer than 1/budget non-members is marked not resolvable
    (value None).
    """
    scores, labels = _check(scores, labels)
    if labels.all() or not labels.any():
        raise ValueError("evaluation needs both members and non-members")
    reader = accuracy if is_balanced(labels) else balanced_accuracy
    fns: dict[str, Callable[..., torch.Tensor]] = {
        "accuracy": lambda s, y, weights=None: reader(s, y, threshold, weights),
        "auc": roc_auc,
    }
    for name, budget in FPR_BUDGETS.items():
        fns[name] = lambda s, y, weights=None, b=budget: tpr_at_fpr(s, y, b, weights)
    out = {}
    for name in METRIC_NAMES:
        if name in FPR_BUDGETS and not is_resolvable(labels, FPR_BUDGETS[name]):
            out[name] = Metric(None, None, None, resolvable=False)
            continue
        value = float(fns[name](scores, labels))
        low, high = bootstrap_interval(fns[name], scores, labels, n_boot=n_boot, seed=seed)
        budget = FPR_BUDGETS.get(name)
        fp = None if budget is None else false_positives_at_fpr(scores, labels, budget)
        out[name] = Metric(value, low, high, resolvable=True, false_positives=fp)
    return out


def is_balanced(labels: torch.Tensor) -> bool:
    """Members and non-members equal in number (accuracy is then plain accuracy)."""
    labels = torch.as_tensor(labels).reshape(-1).bool()
    return int(labels.sum()) * 2 == labels.numel()
