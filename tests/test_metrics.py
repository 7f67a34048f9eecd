"""Metrics against scikit-learn and brute force, on fixed inputs with ties."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    roc_auc_score,
)
from sklearn.metrics import roc_curve as sk_roc_curve

from lightning_mia import metrics as M


def _tied_inputs(n=400, levels=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.rand(n, generator=g) < 0.45
    scores = torch.randint(0, levels, (n,), generator=g).float() + 3.0 * labels.float()
    return scores, labels


def _within(fpr, budget, strict):
    return fpr < budget - 1e-12 if strict else fpr <= budget + 1e-12


def _brute_point(scores, labels, budget, strict=True):
    """(TPR, FP, t) at the lowest threshold t (admit score >= t) with FPR < budget (<=)."""
    s, y = scores.numpy(), labels.numpy()
    for t in np.unique(s):  # ascending: the first allowed threshold is the lowest
        pred = s >= t
        if _within((pred & ~y).sum() / (~y).sum(), budget, strict):
            return (pred & y).sum() / y.sum(), int((pred & ~y).sum()), float(t)
    return 0.0, 0, math.inf


def _brute_tpr_at_fpr(scores, labels, budget, strict=True):
    """Max TPR over thresholds t (admit score >= t) with FPR < budget (<= if not strict);
    t=+inf admits none."""
    s, y = scores.numpy(), labels.numpy()
    best = 0.0
    for t in np.unique(s):
        pred = s >= t
        if _within((pred & ~y).sum() / (~y).sum(), budget, strict):
            best = max(best, (pred & y).sum() / y.sum())
    return best


def test_auc_and_roc_curve_equal_sklearn_with_ties():
    scores, labels = _tied_inputs()
    # both count ranks in float64: equal up to the last bits
    assert float(M.roc_auc(scores, labels)) == pytest.approx(
        roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12
    )
    fpr, tpr, thr = M.roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels.numpy(), scores.numpy(), drop_intermediate=False)
    np.testing.assert_allclose(fpr.numpy(), sk_fpr)
    np.testing.assert_allclose(tpr.numpy(), sk_tpr)
    np.testing.assert_allclose(thr.numpy(), sk_thr)


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("budget", [0.01, 0.05, 0.1, 0.3])
def test_tpr_at_fpr_equals_brute_force(budget, strict):
    scores, labels = _tied_inputs(n=2000, levels=60, seed=1)
    got = float(M.tpr_at_fpr(scores, labels, budget, strict=strict))
    assert got == pytest.approx(_brute_tpr_at_fpr(scores, labels, budget, strict), abs=1e-12)


def test_strict_reading_admits_no_false_positive_at_one_per_mille():
    # 1,000 non-members, one above every member but the top one: TPR@0.1%FPR is read at
    # FPR < 0.1% (no false positive) by default, as Carlini's and PIA's code read it.
    neg = torch.cat([torch.tensor([5.0]), torch.linspace(-10, 0, 999)])
    pos = torch.cat([torch.tensor([6.0]), torch.full((9,), 4.0), torch.linspace(-10, 0, 90)])
    scores, labels = torch.cat([pos, neg]), torch.cat([torch.ones(100), torch.zeros(1000)]).bool()
    assert float(M.tpr_at_fpr(scores, labels, 0.001)) == pytest.approx(0.01)
    assert M.false_positives_at_fpr(scores, labels, 0.001) == 0
    assert float(M.tpr_at_fpr(scores, labels, 0.001, strict=False)) == pytest.approx(0.10)
    assert M.false_positives_at_fpr(scores, labels, 0.001, strict=False) == 1
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels.numpy(), scores.numpy())
    assert sk_tpr[np.where(sk_fpr < 0.001)[0][-1]] == pytest.approx(0.01)  # Carlini's reading


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("budget", [0.01, 0.05, 0.3])
def test_threshold_at_fpr_and_rates_at(budget, strict):
    scores, labels = _tied_inputs(n=2000, levels=60, seed=8)
    tpr, fp, cut = _brute_point(scores, labels, budget, strict)
    assert M.threshold_at_fpr(scores, labels, budget, strict) == cut
    rates = M.rates_at(scores, labels, cut)
    assert rates["false_positives"] == fp and rates["tpr"] == pytest.approx(tpr, abs=1e-12)
    pred = (scores >= cut).numpy()
    tn, fp_sk, fn, tp = confusion_matrix(labels.numpy(), pred).ravel()
    assert (rates["false_positives"], rates["true_positives"]) == (fp_sk, tp)
    assert rates["fpr"] == pytest.approx(fp_sk / (fp_sk + tn))
    assert rates["non_members"] + rates["members"] == 2000
    # too few non-members for the budget: the cut admits none of them
    few = M.threshold_at_fpr(scores[:40], labels[:40], 0.01)
    assert few > float(scores[:40][~labels[:40]].max())
    assert M.rates_at(scores[:40], labels[:40], few)["false_positives"] == 0


def test_tpr_at_fpr_is_not_the_nearest_fpr():
    # 190 non-members: FPR steps are 1/190 = 0.0053 and 2/190 = 0.0105; the point nearest to
    # 1% is over budget and has a higher TPR (three members tie the second non-member at 8).
    neg = torch.cat([torch.tensor([10.0, 8.0]), torch.linspace(-5, 0, 188)])
    pos = torch.cat([torch.tensor([11.0, 9.0, 9.0, 9.0, 8.0, 8.0, 8.0]), torch.linspace(-5, 0, 93)])
    scores = torch.cat([pos, neg])
    labels = torch.cat([torch.ones(100), torch.zeros(190)]).bool()
    fpr, tpr, _ = M.roc_curve(scores, labels)
    nearest = int(torch.argmin((fpr - 0.01).abs()))
    assert float(fpr[nearest]) > 0.01 and float(tpr[nearest]) == pytest.approx(0.07)
    got = float(M.tpr_at_fpr(scores, labels, 0.01))
    assert got == pytest.approx(0.04)  # threshold 9: members 11, 9, 9, 9; one FP (score 10)
    assert got == pytest.approx(_brute_tpr_at_fpr(scores, labels, 0.01))


def test_tied_block_is_admitted_together():
    # A tie of one member and two non-members straddles the budget: it cannot be half admitted.
    scores = torch.tensor([5.0, 3.0, 3.0, 3.0] + [0.0] * 97)
    labels = torch.tensor([1, 1, 0, 0] + [0] * 97).bool()
    # 99 non-members < 100: 1% not resolvable; use 2% (allowed FP = 1).
    assert float(M.tpr_at_fpr(scores, labels, 0.02)) == pytest.approx(0.5)


def test_not_resolvable_with_few_non_members():
    scores, labels = _tied_inputs(n=150)
    assert (~labels).sum() < 1000
    assert math.isnan(float(M.tpr_at_fpr(scores, labels, 0.001)))
    report = M.evaluate(scores, labels, threshold=10.0, n_boot=50)
    assert report["tpr@0.1%fpr"] == M.Metric(None, None, None, resolvable=False)
    assert report["tpr@0.1%fpr"].format() == "n/r"
    assert report["auc"].resolvable and report["auc"].low <= report["auc"].value


@pytest.mark.parametrize("balanced", [True, False])
def test_accuracy_and_threshold_from(balanced):
    scores, labels = _tied_inputs(seed=3)  # about 45% members: the two criteria differ
    metric = balanced_accuracy_score if balanced else accuracy_score
    t = M.threshold_from(scores, labels, balanced=balanced)
    reader = M.balanced_accuracy if balanced else M.accuracy
    acc = float(reader(scores, labels, t))
    assert acc == pytest.approx(metric(labels.numpy(), (scores >= t).numpy()))
    best = max(
        metric(labels.numpy(), (scores >= c).numpy()) for c in [*scores.unique().tolist(), math.inf]
    )
    assert acc == pytest.approx(best)


def test_threshold_from_maximises_balanced_accuracy_with_unequal_classes():
    # 10 members at 5..9.5, 90 non-members spread over 0..8: plain accuracy admits only the
    # members above every non-member (balanced 0.69), balanced accuracy admits them all (0.81).
    scores = torch.cat([5 + 0.5 * torch.arange(10.0), torch.linspace(0, 8, 90)])
    labels = torch.cat([torch.ones(10), torch.zeros(90)]).bool()
    plain = M.threshold_from(scores, labels, balanced=False)
    fair = M.threshold_from(scores, labels)
    assert float(M.balanced_accuracy(scores, labels, fair)) == pytest.approx(0.8111, abs=1e-3)
    assert float(M.balanced_accuracy(scores, labels, plain)) == pytest.approx(0.6944, abs=1e-3)
    assert float(M.accuracy(scores, labels, plain)) == pytest.approx(0.93)


def test_vectorised_bootstrap_equals_loop():
    scores, labels = _tied_inputs(n=300, seed=4)
    fast = M.bootstrap_interval(M.roc_auc, scores, labels, n_boot=60, seed=7)
    slow = M.bootstrap_interval(lambda s, y: M.roc_auc(s, y), scores, labels, n_boot=60, seed=7)
    assert fast == pytest.approx(slow, abs=1e-12)
    value = float(M.roc_auc(scores, labels))
    assert fast[0] < value < fast[1]


def test_bootstrap_on_ten_thousand_samples():
    # (its speed: benchmarks/bench_data_metrics.py; a test must not time anything)
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(10_000, generator=g) < 0.5
    scores = torch.randn(10_000, generator=g) + labels.float()
    low, high = M.bootstrap_interval(M.roc_auc, scores, labels, n_boot=1000, seed=0)
    assert low < float(M.roc_auc(scores, labels)) < high
    assert 0.70 < low < high < 0.82


@pytest.mark.parametrize("budget", [0.01, 0.05, 0.3])
def test_false_positives_admitted_at_the_point_read(budget):
    scores, labels = _tied_inputs(n=2000, levels=60, seed=5)
    tpr, fp, _ = _brute_point(scores, labels, budget)
    assert float(M.tpr_at_fpr(scores, labels, budget)) == pytest.approx(tpr, abs=1e-12)
    assert M.false_positives_at_fpr(scores, labels, budget) == fp
    assert fp < budget * int((~labels).sum())
    # scikit-learn's ROC: the largest TPR among the points with FPR below the budget
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels.numpy(), scores.numpy())
    assert tpr == pytest.approx(sk_tpr[sk_fpr < budget - 1e-12].max(), abs=1e-12)


def test_false_positives_in_the_report_and_its_json():
    scores, labels = _tied_inputs(n=600, seed=6)
    report = M.evaluate(scores, labels, threshold=10.0, n_boot=50)
    tpr1 = report["tpr@1%fpr"]
    assert tpr1.false_positives == M.false_positives_at_fpr(scores, labels, 0.01)
    assert tpr1.format().endswith(f"({tpr1.false_positives} FP)")
    assert M.Metric.from_dict(tpr1.to_dict()) == tpr1
    assert "false_positives" not in report["auc"].to_dict()  # only where it means something
    assert M.false_positives_at_fpr(scores[:50], labels[:50], 0.01) == -1  # not resolvable


def test_balanced_accuracy_when_classes_are_unequal():
    scores, labels = _tied_inputs(n=500, seed=7)
    labels = labels & (torch.arange(500) % 3 > 0)  # about 30% members
    assert not M.is_balanced(labels)
    t = 12.0
    expected = balanced_accuracy_score(labels.numpy(), (scores >= t).numpy())
    assert float(M.balanced_accuracy(scores, labels, t)) == pytest.approx(expected, abs=1e-12)
    assert float(M.accuracy(scores, labels, t)) != pytest.approx(expected, abs=1e-3)
    report = M.evaluate(scores, labels, threshold=t, n_boot=50)
    assert report["accuracy"].value == pytest.approx(expected, abs=1e-12)
    equal = torch.arange(400) % 2 == 0
    assert M.is_balanced(equal)
    assert float(M.balanced_accuracy(scores[:400], equal, t)) == pytest.approx(
        float(M.accuracy(scores[:400], equal, t)), abs=1e-12
    )
