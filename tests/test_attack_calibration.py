"""LiRA on synthetic Gaussian scores: recovers a known IN/OUT separation, ~chance without one."""

import pytest
import torch

from lightning_mia.attack.calibration import (
    fit_gaussians,
    lira_offline,
    lira_online,
    lira_scores,
    shadow_score_matrix,
)
from lightning_mia.metrics import bootstrap_interval, roc_auc
from lightning_mia.query.shards import QueryTable
from lightning_mia.specs.attacks import AttackError
from lightning_mia.specs.query import QueryRecord


def _world(shift, num_shadows=16, num_samples=600, noise=0.5, seed=0):
    """Per-sample difficulty (spread 3) dwarfs the membership shift: raw scores barely work."""
    g = torch.Generator().manual_seed(seed)
    base = 3.0 * torch.randn(num_samples, generator=g)  # (S,)
    is_in = torch.rand(num_shadows, num_samples, generator=g) < 0.5  # (M, S)
    shadow = base + shift * is_in + noise * torch.randn(num_shadows, num_samples, generator=g)
    member = torch.rand(num_samples, generator=g) < 0.5
    target = base + shift * member + noise * torch.randn(num_samples, generator=g)
    return shadow, is_in, target, member


@pytest.mark.parametrize("online", [True, False])
def test_lira_recovers_separation(online):
    shadow, is_in, target, member = _world(shift=1.0)
    g = fit_gaussians(shadow, is_in)
    scores = lira_online(target, g) if online else lira_offline(target, g)
    assert float(roc_auc(scores, member)) > 0.85
    assert float(roc_auc(target, member)) < 0.65  # uncalibrated score


def test_lira_without_separation_is_chance():
    shadow, is_in, target, member = _world(shift=0.0)
    scores = lira_online(target, fit_gaussians(shadow, is_in))
    low, high = bootstrap_interval(roc_auc, scores, member, n_boot=300, seed=0)
    assert low < 0.5 < high


def test_few_shadows_use_global_variance():
    shadow, is_in, target, member = _world(shift=1.0, num_shadows=3)
    g = fit_gaussians(shadow, is_in, min_count=4)
    assert torch.isfinite(g.std_in).all() and torch.isfinite(g.std_out).all()
    assert g.std_out.unique().numel() == 1  # every sample fell back to the global variance
    assert torch.isfinite(g.mean_in).all()  # samples no IN shadow saw borrow the mean shift
    assert float(roc_auc(lira_online(target, g), member)) > 0.75


def _table(ids, member, values, index):
    return QueryTable(
        sample_id=ids,
        is_member=member,
        model_index=index,
        features={"loss/mean": values.float()},
        record=QueryRecord(run_name=f"diffusion-shadow-{index:03d}"),
    )


def test_lira_scores_from_tables_match_by_sample_id():
    shadow, is_in, target, member = _world(shift=1.0, num_shadows=8, num_samples=300)
    ids = torch.arange(300) * 3 + 7
    target_table = _table(ids, member, -target, 0)  # lower loss = member: direction is learned
    shadows = []
    for m in range(8):
        keep = torch.randperm(300, generator=torch.Generator().manual_seed(m))[:250].sort().values
        shadows.append(_table(ids[keep], is_in[m, keep], -shadow[m, keep], m + 1))
    scores, inside, observed = shadow_score_matrix(target_table, shadows, "loss/mean")
    assert observed.sum() == 8 * 250
    assert torch.equal(inside[observed], is_in[observed])
    calibrated = lira_scores(target_table, shadows, "loss/mean", online=True)
    assert float(roc_auc(calibrated, member)) > 0.8 > float(roc_auc(target, member)) + 0.1


def test_lira_needs_shadows_on_the_target_pool():
    _, _, target, member = _world(shift=1.0, num_samples=50)
    target_table = _table(torch.arange(50), member, target, 0)
    other = _table(torch.arange(1000, 1050), member, target, 1)
    with pytest.raises(AttackError, match="no shadow model was queried"):
        lira_scores(target_table, [other], "loss/mean")
