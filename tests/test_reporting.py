"""Report files (atomic, all-or-nothing), the terminal table, and the W&B helpers offline."""

import json

import pytest
import torch
from wandb_offline import offline_runs

from lightning_mia import reporting as W
from lightning_mia.attack import render as R
from lightning_mia.attack.report import AttackReport, AttackResult, read_report
from lightning_mia.metrics import evaluate


def _result(name, shift, access="black-box", seed=0, n=300):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2 == 0
    scores = torch.randn(n, generator=g) + shift * labels
    metrics = evaluate(scores, labels, threshold=shift / 2, n_boot=50)
    return AttackResult(
        name, access, 4 if access == "black-box" else 0, metrics, [f"{name}/x"],
        scores=scores, labels=labels, sample_id=torch.arange(n) + 100,
    )  # fmt: skip


def _report():
    return AttackReport(
        setting="shadow",
        family="diffusion",
        num_images=4,
        num_shadows=2,
        seeds={"attack": 0},
        splits_hash="abc",
        target={
            "run_name": "diffusion-target-000",
            "train_steps_per_image": 250.0,
            "augmentation": {},
        },  # fmt: skip
        attacks={"pixel": _result("pixel", 2.0), "text": _result("text", 0.3, seed=1)},
        baselines={"blind": _result("blind", 0.0, access="none", seed=2)},
        test_samples={"members": 150, "non_members": 150},
        notes=["a note"],
    )


def test_report_files_and_round_trip(tmp_path):
    report = _report()
    roc = R.write_report(tmp_path, report)
    assert roc == tmp_path / R.ROC_PNG and roc.read_bytes()[:4] == b"\x89PNG"
    doc = json.loads((tmp_path / R.REPORT_JSON).read_text())
    assert doc["attacks"]["pixel"]["metrics"]["tpr@1%fpr"]["resolvable"] is True
    assert doc["attacks"]["pixel"]["metrics"]["tpr@0.1%fpr"]["value"] is None
    again = read_report(tmp_path)
    assert again.to_dict() == report.to_dict()
    markdown = (tmp_path / R.REPORT_MD).read_text()
    assert "| pixel | black-box | 4 |" in markdown and "n/r" in markdown and "a note" in markdown


def test_format_table_shows_intervals_and_unresolvable():
    text = R.format_table(_report())
    lines = text.splitlines()
    assert "TPR@0.1%FPR" in lines[1]
    pixel = next(line for line in lines if line.startswith("pixel"))
    auc = _report().attacks["pixel"].metrics["auc"]
    assert f"{auc.value:.3f} [{auc.low:.3f}, {auc.high:.3f}]" in pixel
    assert pixel.rstrip().endswith("n/r")
    assert any(line.startswith("blind (baseline)") for line in lines)


def test_failure_writes_nothing(tmp_path):
    report = _report()
    report.attacks["pixel"].details = {"bad": object()}  # not JSON-serialisable
    with pytest.raises(TypeError):
        R.write_report(tmp_path / "attack", report)
    assert not (tmp_path / "attack").exists() or not any((tmp_path / "attack").iterdir())
    good = _report()
    R.write_report(tmp_path, good)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(TypeError):
        R.write_report(tmp_path, report)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old report intact


def test_wandb_helpers_are_noops_without_wandb(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    for logger in (None, object(), [None]):
        W.log_report(logger, _report(), tmp_path / "roc.png")
        W.log_image_grid(logger, "samples", images, ["a", "b"], step=0)
        W.log_query_table(logger, images[:, 0], images, ["a", "b"], torch.tensor([1, 0]))
        W.log_feature_histograms(logger, {"pixel/x": torch.randn(4)}, torch.tensor([1, 0, 1, 0]))
    assert list(tmp_path.iterdir()) == []  # no run, no file, no wandb/ folder


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B in offline mode, with every file it writes (also its caches) under tmp_path."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    yield tmp_path
    W.finish_wandb_run()


def test_offline_run_holds_the_report_and_the_images(offline_wandb):
    exp = offline_wandb / "exp"
    logger = W.make_logger(exp, name="demo/attack", job_type="attack", group="demo")
    report = _report()
    roc = R.write_report(exp / "attack", report)
    images = torch.rand(2, 3, 3, 8, 8) * 2 - 1
    W.log_report(logger, report, roc)
    W.log_image_grid(logger, "samples", images, ["a", "b"], step=0)
    W.log_query_table(logger, images[:, 0], images, ["a", "b"], torch.tensor([1, 0]))
    W.log_feature_histograms(logger, {"pixel/x": torch.randn(4)}, torch.tensor([1, 0, 1, 0]))
    W.finish_wandb_run()
    (run,) = offline_runs(exp / "wandb")
    assert (run.name, run.group, run.job_type) == ("demo/attack", "demo", "attack")
    auc = report.attacks["pixel"].metrics["auc"].value
    assert run.summary["attack/pixel/auc"] == pytest.approx(auc)  # a float through JSON
    assert run.summary["baseline/blind/auc"] == pytest.approx(
        report.baselines["blind"].metrics["auc"].value
    )
    media = " ".join(run.files)
    for key in ("attack/results", "attack/scores", "query/examples"):
        assert f"media/table/{key}" in media, (key, run.files)
    assert "media/images/attack/roc" in media and "media/images/samples" in media
    scores = next(h for h in run.history if "attack/scores/_type" in h or "attack/scores" in h)
    assert scores  # the per-sample scores table was logged as a history row
    hist = run.summary["features/pixel/x/member/_type"]
    assert hist == "histogram"


def test_offline_without_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "")
    (tmp_path / "netrc").write_text("machine example.com login a password b\n")
    assert not W.has_wandb_api_key() and W.wandb_mode() == "offline"
    assert "wandb sync" in W.wandb_mode_note(tmp_path)
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password secret\n")
    assert W.has_wandb_api_key() and W.wandb_mode() == "online"
    assert W.wandb_mode_note() is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert W.wandb_mode() == "offline"
