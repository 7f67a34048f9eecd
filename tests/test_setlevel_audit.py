"""The set-level audit as the attack command drives it: inputs from query tables, bad input,
the shift guard, user-level groups, and what is written (JSON, report section, PNG, W&B items)."""

import ast
import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from lightning_mia.errors import UserError
from lightning_mia.query.shards import QueryTable
from lightning_mia.setlevel import (
    CONFOUNDED,
    DETECTED,
    NOT_DETECTED,
    AuditOptions,
    DatasetInferenceResult,
    FeatureRows,
    SetLevelError,
    audit_tables,
    dataset_inference,
    digest_map,
    group_map,
    markdown_section,
    take_rows,
    terminal_lines,
    wandb_items,
    write_dataset_inference,
)
from lightning_mia.setlevel.difficulty import out_mean
from lightning_mia.setlevel.rows import check_same_source
from lightning_mia.setlevel.scorer import fit_scorer

NAMES = [f"loss/t{i}" for i in range(6)]
BLIND = ["blind/mean_r", "blind/hf_energy"] + [f"blind/img_emb_{i}" for i in range(12)]
FAST = AuditOptions(subset_repeats=10, subset_points=6)


def make_rows(name, ids, rng, shift=0.0, blind_shift=0.0, member=False):
    n = len(ids)
    feats = {f: rng.normal(size=n) + shift for f in NAMES}
    feats.update({f: rng.normal(size=n) + blind_shift for f in BLIND})
    return FeatureRows(name, np.asarray(ids), feats, np.full(n, member))


def shadow(rng, start, n=400, shift=0.5):
    a = make_rows("s", range(start, start + n // 2), rng, shift, member=True)
    b = make_rows("s", range(start + n // 2, start + n), rng)
    feats = {k: np.r_[a.features[k], b.features[k]] for k in a.features}
    return FeatureRows(
        f"shadow {start}", np.r_[a.sample_id, b.sample_id], feats, np.r_[a.is_member, b.is_member]
    )


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_members_are_detected_and_non_members_are_not(rng):
    s = make_rows("suspect set", range(200), rng, shift=0.4)
    r = make_rows("reference set", range(1000, 1200), rng)
    res = dataset_inference(s, r, options=FAST)
    assert res.decision == DETECTED and res.aggregation == "held-out"
    assert (res.suspect_fit, res.reference_fit) == (100, 100)
    assert (res.outcome.suspect_n, res.outcome.reference_n) == (100, 100)
    assert res.shift is not None and not res.shift.detected
    null = dataset_inference(make_rows("suspect set", range(200), rng), r, options=FAST)
    assert null.decision == NOT_DETECTED and "no evidence that the set was unused" in null.statement


def test_shadow_rows_fit_the_aggregation_and_every_suspect_sample_is_tested(rng):
    s = make_rows("suspect set", range(150), rng, shift=0.4)
    r = make_rows("reference set", range(1000, 1150), rng)
    shadows = [shadow(rng, 10_000), shadow(rng, 20_000)]
    res = dataset_inference(s, r, shadows, options=FAST)
    assert res.aggregation == "shadow" and res.shadow_rows == 800
    assert res.outcome.suspect_n == 150 and res.suspect_fit == 0
    both = dataset_inference(
        s, r, shadows, options=AuditOptions(aggregation="shadow+held-out", subset_repeats=0)
    )
    assert both.shadow_rows == 800 and both.suspect_fit == 75
    assert set(res.features) == set(NAMES)  # blind features never enter the membership score


def test_the_shift_guard_withholds_a_claim_the_query_data_alone_explains(rng):
    # suspect images differ from the reference images (another distribution), no training
    s = make_rows("suspect set", range(200), rng, shift=0.4, blind_shift=0.6)
    r = make_rows("reference set", range(1000, 1200), rng)
    res = dataset_inference(s, r, options=FAST)
    assert res.outcome.p_value < 0.01
    assert res.shift.detected and res.decision == CONFOUNDED
    assert "Confounded" in res.statement and "distribution" in res.statement
    assert "DETECTS the suspect set" in markdown_section(res)
    assert res.shift.outcome.auc > 0.6  # by how much, reported
    assert any(f.startswith("blind/img_emb_pc") for f in res.shift.features)


def test_groups_get_one_p_value_each_with_benjamini_hochberg(rng):
    used = make_rows("u", range(0, 120), rng, shift=0.6)
    unused = make_rows("u", range(120, 360), rng)
    s = FeatureRows(
        "suspect set",
        np.r_[used.sample_id, unused.sample_id],
        {k: np.r_[used.features[k], unused.features[k]] for k in used.features},
    )
    groups = {i: f"artist{i // 60}" for i in range(360)}  # artists 0, 1 used; 2..5 not
    groups[359] = "solo"  # a group of one sample: not tested
    r = make_rows("reference set", range(1000, 1300), rng)
    for options in (FAST, AuditOptions(aggregation="shadow", subset_repeats=0)):
        shadows = [shadow(rng, 10_000)] if options.aggregation == "shadow" else []
        res = dataset_inference(s, r, shadows, groups=groups, group_by="artist", options=options)
        by = {g.name: g for g in res.groups}
        assert {by["artist0"].decision, by["artist1"].decision} == {DETECTED}
        assert all(by[f"artist{i}"].decision == NOT_DETECTED for i in range(2, 6))
        assert by["solo"].outcome is None and by["solo"].q_value is None
        q = [g.q_value for g in res.groups if g.q_value is not None]
        p = [g.outcome.p_value for g in res.groups if g.outcome is not None]
        assert all(qi >= pi for qi, pi in zip(q, p))
        assert all(g.shift_p is not None for g in res.groups if g.outcome is not None)
    md = markdown_section(res)
    assert "Per artist (Benjamini-Hochberg over 6 tested groups" in md
    assert "| artist0 | 60 |" in md
    assert any("2 of 7 artists detected" in line for line in terminal_lines(res))


def test_a_group_missing_from_the_labels_is_named(rng):
    s = make_rows("suspect set", range(20), rng)
    r = make_rows("reference set", range(100, 120), rng)
    with pytest.raises(SetLevelError, match="--group-by user: 1 samples of the suspect set"):
        dataset_inference(s, r, groups={i: "a" for i in range(19)}, group_by="user")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(s_ids=range(3)), "suspect set too small for the held-out split: 3 samples"),
        (dict(r_ids=range(5, 15)), r"overlap: 5 sample ids in both, e.g. \[5, 6, 7, 8, 9\]"),
        (dict(options=AuditOptions(alpha=1.5, fit_fraction=0.0)), "alpha must lie .*; fit_frac"),
        (dict(options=AuditOptions(aggregation="shadow")), "needs shadow rows; none were given"),
        (dict(options=AuditOptions(features=("pixel/",))), "no membership features starting"),
    ],
)
def test_bad_input_is_one_clear_error(rng, change, message):
    s = make_rows("suspect set", change.get("s_ids", range(10)), rng)
    r = make_rows("reference set", change.get("r_ids", range(100, 110)), rng)
    with pytest.raises(SetLevelError, match=message) as err:
        dataset_inference(s, r, options=change.get("options", FAST))
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)


def test_difficulty_calibration_runs_where_every_tested_sample_was_queried(rng, tmp_path):
    """`auto` calibrates with the shadows' queries of every tested sample, falls back to raw
    features where one lacks them, and `shadows` then refuses in one line naming the samples."""
    s = make_rows("suspect set", range(120), rng, shift=0.3)
    r = make_rows("reference set", range(1000, 1120), rng)
    shadows = [shadow(rng, 10_000), shadow(rng, 20_000)]
    ids = [*range(120), *range(1000, 1120)]
    calibration = [make_rows(f"shadow {k}'s query", ids, rng) for k in (1, 2)]
    res = dataset_inference(s, r, shadows, options=FAST, calibration=calibration)
    assert res.difficulty_models == 2 and res.uncalibrated is not None
    assert len(res.assumptions) == 4 and "same way whether it is in" in res.assumptions[-1]
    back = DatasetInferenceResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert back == res and back.uncalibrated == res.uncalibrated
    assert "Without difficulty calibration" in markdown_section(res)
    assert "difficulty-calibrated" in terminal_lines(res)[0]
    assert "uncalibrated_p_value" in "".join(wandb_items(res).scalars)
    short = [make_rows("shadow 1's query", ids[3:], rng), calibration[1]]
    fallback = dataset_inference(s, r, shadows, options=FAST, calibration=short)
    assert fallback.difficulty_models == 0 and fallback.uncalibrated is None
    assert "raw features" in fallback.difficulty and len(fallback.assumptions) == 3
    assert "shadow 1's query has no rows for 3 samples" in fallback.difficulty
    assert "raw features" in markdown_section(fallback)
    # a shadow that trained on a sample (IN) does not calibrate it; with none OUT, no calibration
    inside = [replace(c, is_member=np.isin(c.sample_id, range(10))) for c in calibration]
    mean = out_mean([inside[0], calibration[1]], s, res.features)
    assert np.allclose(mean[:10], calibration[1].select(range(10)).matrix(res.features))
    assert np.allclose(
        mean[10:],
        (
            inside[0].select(range(10, 120)).matrix(res.features)
            + calibration[1].select(range(10, 120)).matrix(res.features)
        )
        / 2,
    )
    nobody_out = dataset_inference(s, r, shadows, options=FAST, calibration=inside)
    assert nobody_out.difficulty_models == 0
    assert "every shadow trained on 10 samples of the suspect set" in nobody_out.difficulty
    strict = replace(FAST, difficulty="shadows")
    with pytest.raises(
        SetLevelError,
        match=r"shadow 1's query has no rows for 3 samples of the "
        r"suspect set, e.g. \[0, 1, 2\]",
    ) as err:
        dataset_inference(s, r, shadows, options=strict, calibration=short)
    assert "\n" not in str(err.value)
    with pytest.raises(SetLevelError, match="no shadow model was queried on the tested"):
        dataset_inference(s, r, shadows, options=strict)
    with pytest.raises(SetLevelError, match="with the shadow aggregation only, not 'held-out'"):
        dataset_inference(s, r, options=strict, calibration=calibration)
    with pytest.raises(SetLevelError, match="difficulty must be one of"):
        dataset_inference(s, r, shadows, options=replace(FAST, difficulty="yes"))


def test_the_aggregation_is_checked_on_shadows_it_never_saw(rng):
    """Shadows with a membership shift: the score fitted on one ranks the other's members
    high; shadows without one: about 0.5, and the report says a miss then means little."""
    s = make_rows("suspect set", range(100), rng)
    r = make_rows("reference set", range(1000, 1100), rng)
    learnable = [shadow(rng, 10_000, shift=0.5), shadow(rng, 20_000, shift=0.5)]
    res = dataset_inference(s, r, learnable, options=FAST)
    auc, p = res.shadow_transfer
    assert auc > 0.75 and p < 1e-10 and "not above chance" not in markdown_section(res)
    none = [shadow(rng, 10_000, shift=0.0), shadow(rng, 20_000, shift=0.0)]
    res = dataset_inference(s, r, none, options=FAST)
    auc, p = res.shadow_transfer
    assert abs(auc - 0.5) < 0.06 and p > 0.01
    assert "not significantly above chance" in markdown_section(res) and any(
        "says little about the suspect set" in line for line in terminal_lines(res)
    )
    assert DatasetInferenceResult.from_dict(json.loads(json.dumps(res.to_dict()))) == res
    assert dataset_inference(s, r, learnable[:1], options=FAST).shadow_transfer is None
    # two shadows: each scored by the fit on the other, its U summed: the textbook numbers
    names = res.features
    u, var, aucs = 0.0, 0.0, []
    for held, other in ((none[0], none[1]), (none[1], none[0])):
        fit = fit_scorer(other.matrix(names), other.is_member, names)
        score = fit.score(held.matrix(names))
        aucs.append(roc_auc_score(held.is_member, score))
        test = mannwhitneyu(score[held.is_member], score[~held.is_member])
        u += test.statistic - 200 * 200 / 2
        var += 200 * 200 * 401 / 12
    assert auc == pytest.approx(np.mean(aucs))
    assert p == pytest.approx(stats.norm.sf(u / np.sqrt(var)))


def test_equal_images_across_the_sets_are_refused(rng):
    s = make_rows("suspect set", range(10), rng)
    r = make_rows("reference set", range(100, 110), rng)
    digests = {i: bytes([i]) * 16 for i in range(10)} | {
        100 + i: bytes([50 + i]) * 16 for i in range(10)
    }
    dataset_inference(s, r, image_digests=digests, options=FAST)  # distinct images: fine
    digests[104] = digests[7]
    with pytest.raises(SetLevelError, match=r"by image content: 1 reference .*7=104"):
        dataset_inference(s, r, image_digests=digests, options=FAST)


def test_shadow_rows_need_both_classes_and_non_finite_features_are_left_out(rng):
    s = make_rows("suspect set", range(40), rng, shift=0.5)
    r = make_rows("reference set", range(100, 140), rng)
    one_class = make_rows("shadow 1", range(500, 540), rng, member=True)
    with pytest.raises(SetLevelError, match="shadow 1: 40 members of 40 rows"):
        dataset_inference(s, r, [one_class], options=FAST)
    s.features["loss/t0"][3] = np.nan
    res = dataset_inference(s, r, options=FAST)
    assert res.dropped_features == ("loss/t0",) and "loss/t0" not in res.features
    assert "Left out (not finite everywhere): loss/t0" in markdown_section(res)


def test_rows_come_from_query_tables_by_sample_id():
    table = QueryTable(
        sample_id=torch.tensor([3, 5, 8, 9]),
        is_member=torch.tensor([True, False, True, False]),
        model_index=0,
        features={"loss/t1": torch.tensor([0.1, 0.2, 0.3, 0.4])},
    )
    rows = take_rows(table, [9, 3], "suspect set")
    assert rows.sample_id.tolist() == [9, 3]
    assert rows.features["loss/t1"].tolist() == pytest.approx([0.4, 0.1])
    assert rows.is_member.tolist() == [False, True]
    assert len(take_rows(table, None, "shadow 1")) == 4
    with pytest.raises(
        SetLevelError, match=r"suspect set: 2 sample ids have no query rows, e.g. \[4, 7\]"
    ):
        take_rows(table, [3, 4, 7], "suspect set")


def test_the_result_round_trips_and_is_written(rng, tmp_path):
    s = make_rows("suspect set", range(120), rng, shift=0.5)
    r = make_rows("reference set", range(1000, 1120), rng)
    groups = {i: f"user{i % 3}" for i in range(120)}
    res = dataset_inference(s, r, groups=groups, group_by="user", options=FAST)
    paths = write_dataset_inference(tmp_path / "attack", res)
    assert [p.name for p in paths] == ["dataset_inference.json", "dataset_inference.png"]
    back = DatasetInferenceResult.from_dict(json.loads(paths[0].read_text()))
    assert back == res
    data = json.loads(paths[0].read_text())
    assert data["decision"] == res.decision and data["statement"] == res.statement
    assert data["curve"]["target_p"] == 0.01 and len(data["assumptions"]) == 3
    png = Image.open(io.BytesIO(paths[1].read_bytes()))
    assert png.format == "PNG" and png.size[0] >= 900
    lines = terminal_lines(res)
    assert 3 <= len(lines) <= 5 and lines[0].startswith("dataset inference: DETECTED")
    items = wandb_items(res, paths[1])
    assert items.scalars["dataset_inference/p_value"] == res.p_value
    columns, rows = items.tables["dataset_inference/curve"]
    assert len(columns) == 5 and len(rows) == len(res.curve.sizes)
    assert items.images["dataset_inference/curve_png"] == paths[1]
    md = markdown_section(res)
    assert md.startswith("## Set-level audit (dataset inference)")
    assert "![dataset inference](dataset_inference.png)" in md and "Assumptions:" in md


def test_without_a_curve_no_png_is_written(rng, tmp_path):
    s = make_rows("suspect set", range(30), rng)
    r = make_rows("reference set", range(100, 130), rng)
    res = dataset_inference(s, r, options=AuditOptions(subset_repeats=0))
    assert res.curve is None
    assert [p.name for p in write_dataset_inference(tmp_path, res)] == ["dataset_inference.json"]
    assert "not computed" in "\n".join(terminal_lines(res))


def test_setlevel_imports_neither_the_attack_stage_nor_wandb():
    root = Path(__file__).resolve().parents[1] / "lightning_mia" / "setlevel"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith(("lightning_mia.attack", "wandb")), (path.name, name)
                assert not name.startswith("lightning_mia.query"), (path.name, name)


def test_audit_tables_reads_the_target_and_shadow_query_tables(tmp_path):
    g = torch.Generator().manual_seed(0)

    def table(n, shift, start):
        member = torch.arange(n) < n // 2
        feats = {f: torch.randn(n, generator=g) + shift * member for f in NAMES}
        feats["blind/mean_r"] = torch.randn(n, generator=g)
        return QueryTable(torch.arange(start, start + n), member, 0, feats)

    target = table(300, 0.5, 0)
    res = audit_tables(target, [table(400, 0.5, 10_000)], options=FAST)
    assert res.aggregation == "shadow" and res.decision == DETECTED
    assert (res.suspect_size, res.reference_size) == (150, 150)
    s, r = list(range(150, 225)), list(range(225, 300))  # non-members against non-members
    null = audit_tables(target, suspect_ids=s, reference_ids=r, options=FAST)
    assert null.decision == NOT_DETECTED and null.aggregation == "held-out"


class _Source:
    def column_values(self, column, ids):
        return [f"{column}{i % 2}" for i in ids]

    def image_digests(self, ids):
        return np.array([bytes([i % 3]) * 16 for i in ids], dtype="S16")


def test_group_and_digest_maps_come_from_a_source():
    assert group_map(_Source(), "user", [1, 2]) == {1: "user1", 2: "user0"}
    assert digest_map(_Source(), [3, 4]) == {3: bytes(16), 4: bytes([1]) * 16}


def test_a_reference_set_from_another_source_is_refused():
    coco = {"name": "coco", "init_args": {"images": "train2014"}}
    check_same_source(coco, dict(coco))
    with pytest.raises(SetLevelError, match="reference set comes from another source"):
        check_same_source(coco, {"name": "imagefolder", "init_args": {"root": "mine"}})


def test_tiny_sets_skip_the_shift_guard_and_say_so(rng):
    s = make_rows("suspect set", range(3), rng, shift=2.0)
    r = make_rows("reference set", range(100, 103), rng)
    res = dataset_inference(s, r, [shadow(rng, 10_000)], options=AuditOptions(subset_repeats=0))
    assert res.shift is None and res.outcome.suspect_n == 3
    assert "nothing rules out a distribution shift" in markdown_section(res)
