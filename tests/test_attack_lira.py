"""LiRA of every attack in the default splits (offline: shadows queried on the target's samples,
all OUT), and the checks on the tables it reads, on synthetic query shards."""

import pytest
import torch

from lightning_mia.attack.calibration import FIXED_VARIANCE_BELOW, calibrate
from lightning_mia.attack.lira import lira_results
from lightning_mia.attack.runner import run_attacks
from lightning_mia.paths import ExperimentLayout, run_name
from lightning_mia.query.shards import QueryTable, load_query_table, write_shard
from lightning_mia.specs.attacks import AttackError, QueryCosts
from lightning_mia.specs.query import QueryRecord, QuerySpec

FAST = dict(max_epochs=8, n_boot=100, progress=False)
N = 200  # target rows: 100 non-members, TPR@1%FPR resolvable
SHADOWS = 4


def _features(difficulty, member, g):
    """Black-box scores where a per-sample difficulty (spread 3) hides a membership shift of 1:
    the raw scores barely separate, calibration against the same sample's OUT scores does."""
    n, m = difficulty.numel(), member.float()
    noise = lambda: 0.3 * torch.randn(n, generator=g)  # noqa: E731
    return {
        "pixel/psnr_max": difficulty + 1.0 * m + noise(),
        "semantic/cos_max": 0.5 * difficulty + 0.5 * m + noise(),
        "text/gen_cos_mean": noise() + 0.2 * m,
        "quality/brisque": noise(),
        "blind/noise": torch.randn(n, generator=g),
    }


def _write(layout, folder, index, ids, member, difficulty, spec=None):
    """One query table: `difficulty` (one per row of `ids`) under the membership `member`."""
    g = torch.Generator().manual_seed(int(ids[0]) + 7 * index)
    name = run_name("diffusion", index)
    spec = QuerySpec(**{"num_images": 4, "seed": 0, "encoder": "enc", **(spec or {})})
    record = QueryRecord(splits_hash="h", run_name=name, family="diffusion", spec=spec)
    feats = _features(difficulty, member, g)
    write_shard(folder / "shard-0.safetensors", ids, member, index, feats, record)
    return load_query_table(folder)


@pytest.fixture
def world(tmp_path):
    """Target on ids 0..N-1, shadows trained on a disjoint auxiliary pool (the default splits),
    each also queried on the target's samples (all OUT for it)."""
    layout = ExperimentLayout(tmp_path / "exp")
    difficulty = 3.0 * torch.randn(N, generator=torch.Generator().manual_seed(1))
    target_ids, half = torch.arange(N), torch.arange(N) % 2 == 0
    target = _write(
        layout, layout.queries(run_name("diffusion", 0)), 0, target_ids, half, difficulty
    )
    shadows, calibration = [], []
    for k in range(1, SHADOWS + 1):
        own_ids = torch.arange(N) + 1000 * k
        own_difficulty = 3.0 * torch.randn(N, generator=torch.Generator().manual_seed(10 + k))
        folder = layout.queries(run_name("diffusion", k))
        shadows.append(_write(layout, folder, k, own_ids, half, own_difficulty))
        out = torch.zeros(N, dtype=torch.bool)
        calibration.append(_write(layout, folder / "row-000", k, target_ids, out, difficulty))
    return layout, target, shadows, calibration


def test_offline_lira_covers_every_attack_black_box_included(world):
    layout, target, shadows, calibration = world
    attacks = ["pixel", "semantic", "combined"]
    report = run_attacks(layout, target, shadows, attacks, calibration=calibration, **FAST)
    for name in attacks:
        assert f"lira-offline-{name}" in report.attacks, sorted(report.attacks)
        assert f"lira-online-{name}" not in report.attacks  # no shadow trained on the target pool
    raw = report.attacks["pixel"].metrics["auc"].value
    lira = report.attacks["lira-offline-pixel"]
    assert lira.metrics["auc"].value > 0.85 and lira.metrics["auc"].value > raw + 0.15, raw
    assert lira.metrics["tpr@1%fpr"].resolvable and lira.access == "black-box"
    assert lira.details["calibrates"] == "pixel/psnr_max" and lira.details["direction"] == 1
    assert lira.details["in_shadows_per_sample"] == {"min": 0, "max": 0}
    assert lira.details["out_shadows_per_sample"] == {"min": SHADOWS, "max": SHADOWS}
    assert lira.details["variance"] == "global (fixed)" and SHADOWS < FIXED_VARIANCE_BELOW
    combined = report.attacks["lira-offline-combined"]  # no declared scalar: its own logit
    assert combined.details["calibrates"] == "the learned attack's logit"
    assert combined.metrics["auc"].low > 0.5  # (the classifier, fitted on raw shadow rows,
    # leans on the difficulty-free text feature, so calibration gains little here)
    assert any(n.startswith("lira-offline-*: offline LiRA over 4 shadows") for n in report.notes)


def test_without_calibration_queries_lira_says_why(world):
    layout, target, shadows, _ = world
    report = run_attacks(layout, target, shadows, ["pixel"], **FAST)
    assert not any(n.startswith("lira") for n in report.attacks)
    assert any("LiRA skipped" in n and "--calibrate" in n for n in report.notes)


def _refused(world, **kwargs):
    layout, target, shadows, calibration = world
    args = {"calibration": calibration, **FAST, **kwargs}
    with pytest.raises(AttackError) as info:
        run_attacks(layout, target, args.pop("shadows", shadows), ["pixel"], **args)
    assert not layout.attack.exists()
    return str(info.value)


def test_calibration_tables_must_match_their_shadows(world):
    _, _, shadows, calibration = world
    message = _refused(world, calibration=calibration[::-1])
    expected = "calibration table of 'diffusion-shadow-004' given for shadow 'diffusion-shadow-001'"
    assert expected in message
    assert "4 calibration tables for 3 shadow tables" in _refused(world, shadows=shadows[:3])
    layout, target, _, _ = world
    half = target.sample_id[:150]
    short = _write(
        layout, layout.root / "short", 1, half, torch.zeros(150, dtype=torch.bool), torch.zeros(150)
    )
    message = _refused(world, calibration=[short, *calibration[1:]])
    assert "calibration query of diffusion-shadow-001 lacks 50 of the target's samples" in message


def test_query_settings_must_agree_one_line(world, tmp_path):
    layout, target, shadows, calibration = world
    other = _write(
        layout,
        tmp_path / "other",
        2,
        shadows[1].sample_id,
        shadows[1].is_member,
        torch.zeros(N),
        spec={"seed": 5, "encoder": "/models/clip"},
    )
    message = _refused(world, shadows=[shadows[0], other, *shadows[2:]])
    assert message.count("\n") == 0, message
    assert "shadow diffusion-shadow-002 was queried otherwise than the target" in message
    assert "spec.seed: 0 vs 5" in message
    assert "spec.encoder: 'enc' vs '/models/clip'" in message


def _loss_table(index, ids, member, log_loss):
    """An in-memory query table of one positive error, `loss/mean` = exp(log_loss)."""
    record = QueryRecord(splits_hash="h", run_name=run_name("diffusion", index), family="diffusion")
    return QueryTable(ids, member, index, {"loss/mean": log_loss.exp().float()}, record)


def test_lira_fits_raw_scores_at_the_mean_when_asked():
    """`scale="identity", centre="mean"` (bench_lira_scale.py's before) is LiRA of the raw
    losses centred at each side's mean; the default, of their log at the median."""
    g = torch.Generator().manual_seed(0)
    ids, member, out = torch.arange(N), torch.arange(N) % 2 == 0, torch.zeros(N, dtype=torch.bool)
    difficulty = torch.randn(N, generator=g)
    noisy = lambda shift: difficulty - shift + 0.5 * torch.randn(N, generator=g)  # noqa: E731
    target = _loss_table(0, ids, member, noisy(0.3 * member))
    shadows = [_loss_table(k, ids + 1000 * k, member, noisy(member.float())) for k in (1, 2, 3)]
    tables = [_loss_table(k, ids, out, noisy(0.0)) for k in (1, 2, 3)]  # on the target's ids
    args = (["loss"], target, shadows, tables, {}, QueryCosts(), 0, 10)
    before = lira_results(*args, scale="identity", centre="mean")[0]["lira-offline-loss"]
    after = lira_results(*args)[0]["lira-offline-loss"]
    assert (before.details["scale"], before.details["centre"]) == ("identity", "mean")
    assert (after.details["scale"], after.details["centre"]) == ("log", "median")
    raw = torch.stack([t.features["loss/mean"] for t in tables]).double()  # (3, N), all OUT
    x, is_out = target.features["loss/mean"].double(), torch.zeros(3, N, dtype=torch.bool)
    seen = ~is_out
    for result, f, centre in ((before, lambda v: v, "mean"), (after, torch.log, "median")):
        expected, _ = calibrate(-f(x), -f(raw), is_out, seen, False, True, centre=centre)
        torch.testing.assert_close(result.scores, expected)  # lower loss = member: negated
    assert not torch.equal(before.scores, after.scores)
