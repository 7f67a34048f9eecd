"""Repeats: each its own folder and seeds; mean ± sd across their reports beside the bootstrap
interval, as repeats.json / repeats.md and a terminal table."""

import json
import statistics

import pytest
import torch

from lightning_mia.attack.repeats import (
    REPEATS_JSON,
    REPEATS_MD,
    format_repeats,
    summarize_repeats,
    write_repeats,
)
from lightning_mia.attack.report import AttackReport, AttackResult
from lightning_mia.errors import UserError
from lightning_mia.experiment import repeat_runs
from lightning_mia.metrics import evaluate


def _report(shift, seed, n_non_members=150):
    g = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.ones(150), torch.zeros(n_non_members)]).bool()
    scores = torch.randn(labels.numel(), generator=g) + shift * labels

    def result(name, s):
        return AttackResult(name, "black-box", 4, evaluate(s, labels, 0.5, n_boot=50), [])

    return AttackReport(
        setting="shadow",
        family="diffusion",
        num_images=4,
        num_shadows=2,
        seeds={"attack": seed},
        splits_hash=f"h{seed}",
        target={},
        attacks={"pixel": result("pixel", scores)},
        baselines={"blind": result("blind", torch.randn(labels.numel(), generator=g))},
    )


def test_mean_and_sd_across_repeats_beside_the_bootstrap_interval(tmp_path):
    reports = [_report(1.0, s) for s in range(3)]
    summary = summarize_repeats(reports, ["x", "x/repeat-01", "x/repeat-02"], [0, 1, 2])
    auc = summary["results"]["pixel"]["metrics"]["auc"]
    values = [r.attacks["pixel"].metrics["auc"].value for r in reports]
    assert auc["values"] == values
    assert auc["mean"] == pytest.approx(statistics.fmean(values))
    assert auc["sd"] == pytest.approx(float(torch.tensor(values).std()))  # n - 1
    assert auc["low"] == [r.attacks["pixel"].metrics["auc"].low for r in reports]
    assert summary["results"]["blind"]["kind"] == "baseline"
    assert summary["results"]["pixel"]["metrics"]["tpr@0.1%fpr"]["mean"] is None  # n/r
    text = format_repeats(summary)
    assert f"{auc['mean']:.3f} ± {auc['sd']:.3f} [" in text and "3 repeats" in text
    write_repeats(tmp_path, summary)
    assert json.loads((tmp_path / REPEATS_JSON).read_text()) == summary
    markdown = (tmp_path / REPEATS_MD).read_text()
    assert "repeat 2 (seed 2): `x/repeat-02`" in markdown and "| pixel |" in markdown


def test_a_result_missing_from_one_repeat_is_left_out():
    reports = [_report(1.0, 0), _report(1.0, 1)]
    del reports[1].baselines["blind"]
    assert set(summarize_repeats(reports, ["a", "b"], [0, 1])["results"]) == {"pixel"}


def test_each_repeat_has_its_folder_and_seeds():
    runs = repeat_runs("runs/x", seed=3, repeats=3)
    assert runs[0] == ("runs/x", 3, [])  # repeat 0 is the experiment as configured
    assert runs[2] == ("runs/x/repeat-02", 5, ["--data.seed=5", "--seed_everything=5"])
    with pytest.raises(UserError, match="repeats must be >= 1"):
        repeat_runs("runs/x", 0, 0)
