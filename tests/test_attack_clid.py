"""CLiD_th on fixed inputs: the robust scaler against scikit-learn's, the choice of α and the
scores against the reference's recipe (`cal_clid_th.py`) written with scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import RobustScaler

from lightning_mia.attack.clid import ALPHAS, CLID_FEATURES, fit_clid_threshold, robust_scaler
from lightning_mia.metrics import threshold_from
from lightning_mia.specs.attacks import AttackError

NAMES = ["clid/gap_null", "clid/loss_cond", "clid/score"]  # columns in sorted order, as shards


def rows(loss, discrepancy, seed=0):
    """(S, 3) rows with an unrelated first column, in NAMES order."""
    noise = torch.randn(len(loss), generator=torch.Generator().manual_seed(seed))
    return torch.stack([noise, torch.as_tensor(loss), torch.as_tensor(discrepancy)], 1).double()


def reference_scores(x_shadow, y_shadow, x_target):
    """`cal_clid_th.py` with scikit-learn: [L, -D], RobustScaler fitted on all shadow rows,
    (1 - α)·L + α·(-D) for α on the grid, the α of the best shadow AUC (lower = member)."""
    shadow = np.stack([x_shadow[:, 1], -x_shadow[:, 2]], 1)
    target = np.stack([x_target[:, 1], -x_target[:, 2]], 1)
    scaler = RobustScaler().fit(shadow)
    shadow, target = scaler.transform(shadow), scaler.transform(target)
    best, best_auc = None, 0.0
    for alpha in ALPHAS:
        m = (1 - alpha) * shadow[:, 0] + alpha * shadow[:, 1]
        auc = roc_auc_score(y_shadow, -m)  # members are the low ones
        if auc > best_auc:
            best, best_auc = alpha, auc
    return best, -((1 - best) * target[:, 0] + best * target[:, 1])


def test_robust_scaler_is_sklearns():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(37, 2, generator=g) ** 3, torch.full((37, 1), 2.0)], 1)
    center, scale = robust_scaler(x)
    ref = RobustScaler().fit(x.numpy())
    np.testing.assert_allclose(center.numpy(), ref.center_, rtol=1e-12)
    np.testing.assert_allclose(scale.numpy(), ref.scale_, rtol=1e-12)  # constant column: 1


def test_fit_matches_the_reference_recipe():
    g = torch.Generator().manual_seed(1)
    y = torch.arange(40) < 20
    # both terms informative, on very different scales (the loss ~30x the gaps, as in CLiD)
    loss = 0.1 + 0.02 * torch.randn(40, generator=g) - 0.01 * y
    disc = 0.003 * torch.randn(40, generator=g) + 0.002 * y
    x = rows(loss, disc)
    target = rows(0.1 + 0.02 * torch.randn(30, generator=g), 0.003 * torch.randn(30, generator=g))
    choice = fit_clid_threshold(x, y, NAMES)
    alpha, expected = reference_scores(x.numpy(), y.numpy(), target.numpy())
    assert choice.alpha == alpha and 0 < alpha < 1  # a real mix of the two scaled terms
    np.testing.assert_allclose(choice.scores(target, NAMES).numpy(), expected, rtol=1e-10)
    shadow_scores = choice.scores(x, NAMES)
    assert choice.threshold == threshold_from(shadow_scores, y)
    assert choice.to_dict()["features"] == list(CLID_FEATURES)


def test_alpha_follows_the_informative_term_and_the_first_on_ties():
    y = torch.arange(20) < 10
    informative, flat = torch.where(y, 0.0, 1.0), torch.randn(20, generator=torch.Generator())
    assert fit_clid_threshold(rows(informative, flat), y, NAMES).alpha == 0.0  # loss separates
    by_gap = fit_clid_threshold(rows(flat, 1 - informative), y, NAMES)  # D separates
    alpha, _ = reference_scores(rows(flat, 1 - informative).numpy(), y.numpy(), np.zeros((1, 3)))
    assert by_gap.alpha == alpha > 0.5 and by_gap.shadow_auc == 1.0  # the first α that does
    both = fit_clid_threshold(rows(informative, 1 - informative), y, NAMES)
    assert both.alpha == 0.0 and both.shadow_auc == 1.0  # every α separates: the first


def test_target_rows_are_scaled_with_the_shadow_statistics():
    y = torch.arange(20) < 10
    g = torch.Generator().manual_seed(2)
    x = rows(torch.randn(20, generator=g) - y.double(), torch.randn(20, generator=g))
    choice = fit_clid_threshold(x, y, NAMES)
    shifted = x + torch.tensor([0.0, 5.0, 0.0], dtype=x.dtype)  # every target loss 5 higher
    drop = (1 - choice.alpha) * 5.0 / choice.scale[0]
    torch.testing.assert_close(choice.scores(shifted, NAMES), choice.scores(x, NAMES) - drop)


def test_bad_inputs_fail_with_one_clear_error():
    y = torch.arange(6) < 3
    x = rows(torch.randn(6), torch.randn(6))
    with pytest.raises(AttackError, match=r"missing \['clid/score'\]"):
        fit_clid_threshold(x[:, :2], y, NAMES[:2])
    with pytest.raises(AttackError, match="3 members and 0 non-members"):
        fit_clid_threshold(x[:3], y[:3], NAMES)
    with pytest.raises(AttackError, match=r"alphas must be a non-empty list in \[0, 1\]"):
        fit_clid_threshold(x, y, NAMES, alphas=(0.5, 2.0))
