"""`python -m lightning_mia.summary runs/*` on synthetic experiment folders: one table of every
report, and AUC / TPR@1%FPR against each ablated factor (one factor at a time)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from lightning_mia.attack.render import write_report
from lightning_mia.attack.report import AttackReport, AttackResult
from lightning_mia.metrics import evaluate
from lightning_mia.summary import (
    SUMMARY_MD,
    SUMMARY_PNG,
    ablation_series,
    read_rows,
    summary_main,
)

BASE = {"steps": 500.0, "num_images": 4, "aux_size": 2048, "num_shadows": 2}


def _result(name, shift, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2 == 0
    scores = torch.randn(n, generator=g) + shift * labels
    metrics = evaluate(scores, labels, threshold=shift / 2, n_boot=20)
    return AttackResult(
        name,
        "black-box",
        4,
        metrics,
        [f"{name}/x"],
        scores=scores,
        labels=labels,
        sample_id=torch.arange(n),
    )


def _experiment(root, name, setting="shadow", **factors):
    f = {**BASE, **factors}
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "splits.json").write_text(json.dumps({"config": {"aux_size": f["aux_size"]}}))
    shift = f["steps"] / 250 + f["num_images"] / 8  # leakage grows with both
    report = AttackReport(
        setting=setting,
        family="diffusion",
        num_images=f["num_images"],
        num_shadows=f["num_shadows"],
        seeds={"attack": 0},
        splits_hash="h",
        target={"run_name": "diffusion-target-000", "train_steps_per_image": f["steps"]},
        attacks={"pixel": _result("pixel", shift), "text": _result("text", shift / 4, seed=1)},
        baselines={"blind": _result("blind", 0.0, seed=2)},
    )
    out = folder / "attack" if setting == "shadow" else folder / "attack" / setting
    write_report(out, report)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Six experiments' reports, written once (read-only: a test that adds one copies them)."""
    root = tmp_path_factory.mktemp("summary") / "runs"
    folders = [
        _experiment(root, "demo"),
        _experiment(root, "steps-050", steps=50.0),
        _experiment(root, "steps-100", steps=100.0),
        _experiment(root, "images-01", num_images=1),
        _experiment(root, "images-16", num_images=16),
        _experiment(root, "aux-0256", aux_size=256),
    ]
    (root / "not-an-experiment").mkdir()
    return root, folders


def test_every_report_is_one_row_with_its_factors(runs):
    root, _ = runs
    rows, skipped = read_rows(sorted(root.iterdir()))
    assert skipped == [str(root / "not-an-experiment")]
    by_name = {r.experiment: r for r in rows}
    assert set(by_name) == {"demo", "steps-050", "steps-100", "images-01", "images-16", "aux-0256"}
    assert by_name["steps-050"].factors == {
        "steps_per_image": 50.0,
        "num_images": 4,
        "aux_size": 2048,
        "num_shadows": 2,
    }
    assert by_name["aux-0256"].factors["aux_size"] == 256
    pixel = by_name["demo"].metrics["pixel"]
    assert 0.5 < pixel["auc"] <= 1.0 and pixel["tpr@1%fpr"] is not None
    assert "blind (baseline)" in by_name["demo"].metrics


def test_one_factor_at_a_time(runs):
    root, _ = runs
    rows, _ = read_rows(sorted(root.iterdir()))
    steps = ablation_series(rows, "steps_per_image")
    assert [p[0] for p in steps["pixel"]] == [50.0, 100.0, 500.0]  # not the N or aux runs
    aucs = [p[1] for p in steps["pixel"]]
    assert aucs == sorted(aucs)  # more steps per image, more leakage (as built)
    images = ablation_series(rows, "num_images")
    assert [p[0] for p in images["pixel"]] == [1.0, 4.0, 16.0]
    assert [p[0] for p in ablation_series(rows, "aux_size")["text"]] == [256.0, 2048.0]
    assert ablation_series(rows, "num_shadows") == {}  # it does not vary
    assert "blind (baseline)" not in steps  # baselines are in the table, not the figures


def test_summary_command_writes_the_table_and_the_figure(runs, tmp_path, capsys):
    root = Path(shutil.copytree(runs[0], tmp_path / "runs"))
    _experiment(root, "demo-partial", setting="partial")
    summary_main([str(p) for p in sorted(root.iterdir())])
    table = (root / SUMMARY_MD).read_text()
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0].split(" | ")[:3] == ["| experiment", "setting", "family"]
    assert len(lines) == 1 + 7  # header + 6 shadow reports + 1 partial report
    partial = next(ln for ln in lines if "demo-partial" in ln)
    assert "| partial |" in partial and "| - |" in partial  # no shadow count in that setting
    assert (root / SUMMARY_PNG).read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out
    assert "skipped (no attack report)" in out and str(root / SUMMARY_PNG) in out


def test_no_report_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        summary_main([str(tmp_path / "empty")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no report.json")
