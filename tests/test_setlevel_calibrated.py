"""The set-level audit's second test (`setlevel.calibrated`): Bonferroni over one-sided
Mann-Whitney tests of the LiRA-calibrated rows; calibrated under the null, powerful with a
shifted row, and carried by the result's JSON, terminal lines, report section and W&B keys."""

import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binomtest
from test_setlevel_audit import FAST, make_rows

from lightning_mia.setlevel import (
    CalibratedTest,
    DatasetInferenceResult,
    calibrated_scores_test,
    dataset_inference,
    markdown_section,
    terminal_lines,
    wandb_items,
    write_dataset_inference,
)

SUSPECT, REFERENCE = list(range(32)), list(range(100, 228))  # the demo's 32 vs 128
IDS = SUSPECT + REFERENCE


def rows(rng, shifts, correlated=0.5):
    """Calibrated rows over IDS (correlated like one model's signals), the suspect set's
    scores shifted by each row's `shifts` value (standard deviations)."""
    common = rng.normal(size=len(IDS))
    out = {}
    for k, shift in enumerate(shifts):
        x = correlated * common + (1 - correlated**2) ** 0.5 * rng.normal(size=len(IDS))
        x[: len(SUSPECT)] += shift
        out[f"lira-offline-s{k}"] = (IDS, x.tolist())
    return out


def test_unused_sets_are_detected_no_more_often_than_alpha():
    rng = np.random.default_rng(0)
    trials, alphas = 300, (0.05, 0.01)
    p = np.array(
        [
            calibrated_scores_test(rows(rng, [0.0] * 6), SUSPECT, REFERENCE, repeats=0).p_value
            for _ in range(trials)
        ]
    )
    for alpha in alphas:  # Bonferroni: not more often than alpha (conservative is allowed)
        hits = int((p < alpha).sum())
        assert binomtest(hits, trials, alpha).proportion_ci(0.95).low <= alpha, (alpha, hits)
    one = [
        calibrated_scores_test(rows(rng, [0.0]), SUSPECT, REFERENCE, repeats=0).p_value
        for _ in range(trials)
    ]
    hits = int((np.array(one) < 0.05).sum())  # one row: the test's own size, not conservative
    low, high = binomtest(hits, trials, 0.05).proportion_ci(0.95)
    assert low <= 0.05 <= high, hits


def test_a_shifted_row_is_found_and_named():
    rng = np.random.default_rng(1)
    test = calibrated_scores_test(rows(rng, [0.0, 1.0, 0.0]), SUSPECT, REFERENCE)
    assert test.best == "lira-offline-s1" and test.p_value < 1e-4
    assert test.p_value == pytest.approx(min(1.0, 3 * test.rows["lira-offline-s1"]))
    assert (test.suspect_n, test.reference_n) == (32, 128) and test.auc > 0.7
    assert test.sizes[0] == 5 and test.sizes[-1] == 32 and len(test.medians) == len(test.sizes)
    assert test.smallest_size is not None and 5 < test.smallest_size < 32  # fewer than all 32
    assert test.medians[-1] == pytest.approx(test.p_value)  # all 32 (and all 128): the whole sets
    null = calibrated_scores_test(rows(rng, [0.0, 0.0]), SUSPECT, REFERENCE)
    assert null.smallest_size is None and min(null.medians) > 0.01


def test_only_calibrated_rows_of_both_sets_with_finite_scores_count():
    rng = np.random.default_rng(2)
    scored = rows(rng, [1.0])
    ids, x = scored["lira-offline-s0"]
    scored["lira-offline-s0"] = ([*ids, 999], [*x[:-1], float("nan"), 5.0])  # a NaN, an outsider
    scored["pixel"] = (IDS, [10.0] * 32 + [0.0] * 128)  # not calibrated: left out
    test = calibrated_scores_test(scored, SUSPECT, REFERENCE)
    assert list(test.rows) == ["lira-offline-s0"] and (test.suspect_n, test.reference_n) == (
        32,
        127,
    )
    assert calibrated_scores_test({"pixel": scored["pixel"]}, SUSPECT, REFERENCE) is None


def test_the_result_carries_the_second_test_everywhere(tmp_path):
    rng = np.random.default_rng(3)
    s = make_rows("suspect set", range(120), rng, shift=0.5)
    r = make_rows("reference set", range(1000, 1120), rng)
    res = dataset_inference(s, r, options=FAST)
    test = calibrated_scores_test(rows(rng, [1.0, 0.0]), SUSPECT, REFERENCE)
    both = replace(res, calibrated=test)
    back = DatasetInferenceResult.from_dict(json.loads(json.dumps(both.to_dict())))
    assert back == both and isinstance(back.calibrated, CalibratedTest)
    assert (
        DatasetInferenceResult.from_dict(json.loads(json.dumps(res.to_dict()))).calibrated is None
    )
    line = "detects the suspect set at 0.01: p = "
    assert any(line in x and "best lira-offline-s0" in x for x in terminal_lines(both))
    assert not any("Calibrated scores" in x for x in terminal_lines(res))
    assert "Bonferroni over 2 LiRA rows" in markdown_section(both)
    assert f"smallest set for p < 0.01: {test.smallest_size}" in markdown_section(both)
    json_path, png = write_dataset_inference(tmp_path, both)  # the figure draws both curves
    assert json.loads(json_path.read_text())["calibrated"]["best"] == "lira-offline-s0"
    assert Image.open(png).format == "PNG"
    scalars = wandb_items(both).scalars
    assert scalars["dataset_inference/calibrated_smallest_size"] == test.smallest_size
    assert scalars["dataset_inference/calibrated_p_value"] == test.p_value
    assert scalars["dataset_inference/calibrated_best"] == "lira-offline-s0"
