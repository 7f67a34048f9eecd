"""run_attacks end to end on synthetic shards (2 shadows + 1 target), and each input error."""

import json

import pytest
import torch

from lightning_mia.attack.render import REPORT_JSON, REPORT_MD, ROC_PNG, write_report
from lightning_mia.attack.report import AttackContext, TargetFacts
from lightning_mia.attack.runner import run_attacks
from lightning_mia.metrics import METRIC_NAMES
from lightning_mia.paths import ExperimentLayout, run_name
from lightning_mia.query.shards import load_query_table, write_shard
from lightning_mia.specs.attacks import AttackError
from lightning_mia.specs.query import QueryRecord, QuerySpec

FAST = dict(max_epochs=8, n_boot=100, progress=False)


def _features(member, g):
    """Pixel features leak membership, semantic/text a little, blind not at all."""
    n, m = member.numel(), member.float()
    noise = lambda: torch.randn(n, generator=g)  # noqa: E731
    return {
        "pixel/mse_mean": noise() - 2.5 * m,
        "pixel/ssim_mean": noise() + 1.5 * m,
        "semantic/cos_mean": noise() + 0.5 * m,
        "text/clip_mean": noise() + 0.3 * m,
        "quality/brisque": noise(),
        "blind/caption_length": noise(),
    }


def _write_table(layout, index, n=160, seed=0, family="diffusion", splits="abc123", drop=()):
    g = torch.Generator().manual_seed(seed + index)
    member = torch.arange(n) % 2 == 0
    ids = torch.arange(n) + 1000 * index
    features = {k: v for k, v in _features(member, g).items() if k not in drop}
    name = run_name(family, index)
    meta = QueryRecord(
        splits_hash=splits,
        run_name=name,
        family=family,
        train_steps_per_image=300.0,
        spec=QuerySpec(num_images=4),
    )
    folder = layout.queries(name)
    half = n // 2  # two shards, as two ranks would write
    for k, part in enumerate((slice(0, half), slice(half, n))):
        feats = {f: v[part] for f, v in features.items()}
        write_shard(
            folder / f"shard-{k:03d}.safetensors", ids[part], member[part], index, feats, meta
        )
    return load_query_table(folder)


@pytest.fixture
def world(tmp_path):
    layout = ExperimentLayout(tmp_path / "exp")
    target = _write_table(layout, 0)
    shadows = [_write_table(layout, 1), _write_table(layout, 2)]
    return layout, target, shadows


def test_shadow_setting_end_to_end(world):
    layout, target, shadows = world
    facts = TargetFacts("diffusion-target-000", 300.0, {"flip": False})
    context = AttackContext.from_tables(target, shadows, seed=0, target_facts=facts)
    context = AttackContext(**{**context.__dict__, "seeds": {"query": 3, "attack": 0}})
    report = run_attacks(layout, target, shadows, ["pixel", "combined"], context=context, **FAST)
    assert set(report.attacks) == {"pixel", "combined"}
    assert set(report.baselines) == {"threshold", "blind", "blind-caption"}
    assert report.attacks["pixel"].metrics["auc"].value > 0.9
    assert report.baselines["threshold"].details["feature"].startswith("pixel/")
    assert (layout.attack / "pixel" / "shadow.ckpt").is_file()
    write_report(layout.attack, report)
    for name in (REPORT_JSON, REPORT_MD, ROC_PNG):
        assert (layout.attack / name).stat().st_size > 0
    doc = json.loads((layout.attack / REPORT_JSON).read_text())
    assert doc["setting"] == "shadow" and doc["family"] == "diffusion"
    assert doc["num_images"] == 4 and doc["num_shadows"] == 2 and doc["splits_hash"] == "abc123"
    assert doc["seeds"] == {"query": 3, "attack": 0}
    assert doc["target"] == {
        "run_name": "diffusion-target-000",
        "model_index": 0,
        "train_steps_per_image": 300.0,
        "augmentation": {"flip": False},
    }
    assert doc["test_samples"] == {"members": 80, "non_members": 80}
    for section in ("attacks", "baselines"):
        for entry in doc[section].values():
            assert set(entry["metrics"]) == set(METRIC_NAMES)
            assert entry["metrics"]["tpr@0.1%fpr"] == {
                "value": None,
                "low": None,
                "high": None,
                "resolvable": False,
            }
            assert entry["metrics"]["auc"]["low"] <= entry["metrics"]["auc"]["value"]
    assert doc["attacks"]["pixel"]["queries_per_sample"] == 4
    assert doc["baselines"]["blind"]["queries_per_sample"] == 0
    assert doc["attacks"]["pixel"]["features"] == ["pixel/mse_mean", "pixel/ssim_mean"]
    assert "n/r" in (layout.attack / REPORT_MD).read_text()
    assert (layout.attack / ROC_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_partial_setting_trains_on_known_target_rows(world):
    layout, target, _ = world
    report = run_attacks(
        layout, target, [], ["pixel"], setting="partial", known_fraction=0.5, **FAST
    )
    assert report.known_fraction == 0.5
    assert report.test_samples == {"members": 40, "non_members": 40}
    tested = set(report.attacks["pixel"].sample_id.tolist())
    assert len(tested) == 80 and tested < set(target.sample_id.tolist())
    assert (layout.attack / "pixel" / "partial.ckpt").is_file()


@pytest.mark.slow
def test_target_labels_choose_nothing(world):
    layout, target, shadows = world
    first = run_attacks(layout, target, shadows, ["pixel"], **FAST)
    target.is_member = ~target.is_member
    flipped = run_attacks(layout, target, shadows, ["pixel"], **FAST)
    rule, flipped_rule = first.baselines["threshold"], flipped.baselines["threshold"]
    assert flipped_rule.details == rule.details
    # float64 rank counts: 1 - AUC up to rounding (approx: 1e-6 relative)
    assert flipped_rule.metrics["auc"].value == pytest.approx(1 - rule.metrics["auc"].value)
    # the learned attacks too: same (deterministic) training on shadows, same target scores
    for name, result in first.attacks.items():
        assert torch.equal(flipped.attacks[name].scores, result.scores)
    # the blind diagnostic is the one figure fitted on target labels (cross-validated)
    assert first.baselines["blind"].is_diagnostic


def _error(world, **overrides):
    layout, target, shadows = world
    args = dict(target=target, shadows=shadows, attacks=["pixel"], **FAST)
    args.update(overrides)
    with pytest.raises(AttackError) as info:
        run_attacks(layout, **args)
    assert not layout.attack.exists()  # nothing trained or written before the error
    return str(info.value)


def test_no_shadows(world):
    assert "no shadow tables" in _error(world, shadows=[])


def test_mixed_family_and_splits(world):
    layout = world[0]
    other = _write_table(layout, 3, family="seq2seq", splits="zzz")
    message = _error(world, shadows=[*world[2], other])
    assert "family: 'diffusion' vs 'seq2seq'" in message
    assert "splits_hash: 'abc123' vs 'zzz'" in message


def test_unknown_attack_lists_known_ones(world):
    message = _error(world, attacks=["pixel", "pixle"])
    assert "unknown attacks ['pixle']" in message and "'combined'" in message


def test_missing_features_say_how_to_compute(world):
    layout = world[0]
    lacking = _write_table(layout, 4, drop=("semantic/cos_mean",))
    message = _error(world, shadows=[world[2][0], lacking], attacks=["semantic"])
    assert "diffusion-shadow-004 lacks semantic/cos_mean" in message
    assert "compute the feature groups ['semantic'] in the query stage" in message


def test_target_needs_both_classes(world):
    _, target, _ = world
    target.is_member = torch.ones_like(target.is_member)
    message = _error(world, target=target, attacks=["pixel", "pixle"])
    assert "the target table has 160 members and 0 non-members" in message
    assert "pixle" in message  # every problem in one error


def _loss_table(layout, index, ids, member, per_sample, seed):
    """A gray-box `loss/mean` per sample: a sample-specific difficulty, lower when trained on."""
    g = torch.Generator().manual_seed(seed)
    noise = 0.05 * torch.randn(ids.numel(), generator=g)
    loss = torch.exp(per_sample[ids] - 0.6 * member.float() + noise)  # positive, log-normal
    name = run_name("diffusion", index)
    meta = QueryRecord(
        splits_hash="h", run_name=name, family="diffusion", spec=QuerySpec(num_images=4)
    )
    feats = {"loss/mean": loss, "blind/noise": torch.randn(ids.numel(), generator=g)}
    write_shard(layout.queries(name) / "shard-0.safetensors", ids, member, index, feats, meta)
    return load_query_table(layout.queries(name))


def test_lira_calibrates_gray_box_scores_when_shadows_saw_the_target_samples(tmp_path):
    """Shadows trained on random halves of the target's pool (shadow_pool auxiliary+queries):
    online LiRA removes the per-sample difficulty that hides membership from the raw loss."""
    layout = ExperimentLayout(tmp_path / "exp")
    n = 120
    ids = torch.arange(n)
    per_sample = 3.0 * torch.randn(n, generator=torch.Generator().manual_seed(7))
    tables = []
    for index in range(9):  # target + 8 shadows, each an independent half as members
        member = torch.zeros(n, dtype=torch.bool)
        member[
            torch.randperm(n, generator=torch.Generator().manual_seed(100 + index))[: n // 2]
        ] = 1
        tables.append(_loss_table(layout, index, ids, member, per_sample, seed=index))
    report = run_attacks(layout, tables[0], tables[1:], ["loss"], **FAST)
    raw = report.attacks["loss-mlp"].metrics["auc"].value
    lira = report.attacks["lira-online-loss"].metrics["auc"].value
    assert lira > 0.9 and lira > raw + 0.1, (raw, lira)
    assert report.attacks["lira-online-loss"].access == "gray-box"
    offline = report.attacks["lira-offline-loss"]
    assert offline.metrics["auc"].value > raw + 0.1, (raw, offline.metrics["auc"].value)
    assert offline.details["variance"] == "global (fixed)"  # 8 shadows < 64
    assert offline.details["scale"] == "log" and offline.details["centre"] == "median"
    assert offline.realised.chosen_on == "LiRA's OUT Gaussians"
    assert report.attacks["lira-online-loss"].realised is None  # no label-free 1% cut


def test_lira_is_skipped_with_a_note_on_disjoint_shadows(world):
    layout, target, shadows = world
    for table in (target, *shadows):
        table.features["loss/mean"] = torch.randn(len(table))
    report = run_attacks(layout, target, shadows, ["loss"], **FAST)
    assert not any(name.startswith("lira") for name in report.attacks)
    assert any("LiRA skipped" in note for note in report.notes)
