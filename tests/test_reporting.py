"""Report files (atomic, all-or-nothing), the terminal table, and the W&B helpers offline."""

import json
from pathlib import Path

import pytest
import torch
from tiny_data import DATA
from wandb_offline import offline_runs

from lightning_mia import reporting as W
from lightning_mia.attack import render as R
from lightning_mia.attack.outcome import report_results
from lightning_mia.attack.report import BACKWARDS, AttackReport, AttackResult, read_report
from lightning_mia.attack.scores import SCORES_CSV, read_scores
from lightning_mia.metrics import evaluate


def _result(name, shift, access="black-box", seed=0, n=300):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2 == 0
    scores = torch.randn(n, generator=g) + shift * labels
    metrics = evaluate(scores, labels, threshold=shift / 2, n_boot=50)
    return AttackResult(
        name,
        access,
        4 if access == "black-box" else 0,
        metrics,
        [f"{name}/x"],
        scores=scores,
        labels=labels,
        sample_id=torch.arange(n) + 100,
    )


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
        },
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


def test_flags_false_positives_and_balanced_accuracy_are_shown(tmp_path):
    report = _report()
    backwards = _result("secmi", -1.5, access="gray-box", seed=3)  # members score lower
    assert backwards.ranks_backwards()
    backwards.flags.append(BACKWARDS)
    report.attacks["secmi"] = backwards
    report.baselines["blind"].details["diagnostic"] = "cross-validated on the target"
    text = R.format_table(report)
    assert any(line.startswith("secmi !") for line in text.splitlines())
    assert f"! secmi: {BACKWARDS}" in text
    assert any(line.startswith("blind (diagnostic)") for line in text.splitlines())
    fp = report.attacks["pixel"].metrics["tpr@1%fpr"].false_positives
    assert fp is not None and f"({fp} FP)" in text
    R.write_report(tmp_path, report)
    doc = json.loads((tmp_path / R.REPORT_JSON).read_text())
    assert doc["attacks"]["secmi"]["flags"] == [BACKWARDS]
    assert doc["attacks"]["pixel"]["flags"] == []
    assert doc["attacks"]["pixel"]["metrics"]["tpr@1%fpr"]["false_positives"] == fp
    assert doc["accuracy_is_balanced"] is False and "balanced accuracy" not in text
    markdown = (tmp_path / R.REPORT_MD).read_text()
    assert f"**! secmi: {BACKWARDS}**" in markdown and SCORES_CSV in markdown
    report.test_samples = {"members": 100, "non_members": 200}
    assert "balanced accuracy" in R.format_table(report).splitlines()[1]


def test_scores_file_holds_every_result_and_reads_back_exactly(tmp_path):
    report = _report()
    partial = _result("combined", 1.0, seed=4, n=300)
    keep = torch.arange(300) % 3 > 0  # a result that scored only part of the rows
    partial.scores, partial.labels = partial.scores[keep], partial.labels[keep]
    partial.sample_id = partial.sample_id[keep]
    report.attacks["combined"] = partial
    R.write_report(tmp_path, report)
    table = read_scores(tmp_path)
    assert list(table.scores) == ["pixel", "text", "combined", "blind"]
    assert torch.equal(table.sample_id, torch.arange(300) + 100)
    assert table.model_index.unique().tolist() == [0]
    for _, r in report.results():
        scores, labels = table.column(r.name)
        assert torch.equal(scores, r.scores.double()) and torch.equal(labels, r.labels)
    assert table.scores["combined"].isnan().sum() == 100
    header = (tmp_path / SCORES_CSV).read_text().splitlines()[0]
    assert header == "sample_id,is_member,model_index,pixel,text,combined,blind"


def test_format_table_shows_intervals_and_says_what_no_row_resolves():
    text = R.format_table(_report())
    lines = text.splitlines()
    # 150 non-members resolve no TPR at 0.1% FPR: a line under the table, not a column of n/r
    assert "TPR@1%FPR" in lines[1] and "TPR@0.1%FPR" not in lines[1] and "n/r" not in text
    assert (
        "TPR@0.1%FPR: not resolvable in any row (an FPR of 0.1% needs 1,000 target "
        "non-members or more; 150 here)"
    ) in lines
    pixel = next(line for line in lines if line.startswith("pixel"))
    auc = _report().attacks["pixel"].metrics["auc"]
    assert f"{auc.value:.3f} [{auc.low:.3f}, {auc.high:.3f}]" in pixel
    assert pixel.split()[-2:] == ["FP)", "-"]  # TPR@1%FPR's false positives, no realised cut
    assert any(line.startswith("blind (baseline)") for line in lines)
    # one row that resolves it keeps the column; the others show n/r in it
    report = _report()
    report.attacks["pixel"] = _result("pixel", 2.0, n=2000)
    lines = R.format_table(report).splitlines()
    assert "TPR@0.1%FPR" in lines[1] and not any("not resolvable" in ln for ln in lines)
    text_row = next(line for line in lines if line.startswith("text"))
    assert text_row.split()[-2:] == ["n/r", "-"]
    assert "n/r" in (R.render_markdown(_report()))  # report.md keeps the column


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
        W.log_results(logger, report_results(_report(), tmp_path))
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
    W.log_results(logger, report_results(report, roc.parent))
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


@pytest.fixture(scope="module")
def offline_experiment(tmp_path_factory):
    """A tiny experiment (autoencoder, encoder, target, one shadow, attack) with W&B offline."""
    import yaml

    from lightning_mia.experiment import experiment_main
    from lightning_mia.terminal import configure_terminal

    tmp = tmp_path_factory.mktemp("lineage")
    patch = pytest.MonkeyPatch()
    patch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        patch.setenv(var, str(tmp / "wandb-home" / var.lower()))
    patch.setenv("HOME", str(tmp / "home"))
    root = Path(__file__).resolve().parents[1]
    config = {
        "experiment": str(tmp / "exp"),
        "family": "diffusion",
        "num_shadows": 1,
        "stages": {
            "autoencoder": str(root / "configs/autoencoder/tiny-kl.yaml"),
            "encoder": str(root / "configs/encoder/tiny.yaml"),
            "model": str(root / "configs/diffusion/tiny.yaml"),
            "data_args": DATA,
            "trainer_args": [
                "--trainer.max_steps=3",
                "--trainer.log_every_n_steps=1",
                "--trainer.enable_progress_bar=false",
            ],
            "model_args": ["--model.init_args.num_inference_steps=2"],
        },
        "query": {
            "num_images": 2,
        },
        "attack": {
            "attacks": ["pixel"],
            "max_epochs": 5,
        },
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    try:
        (outcome,) = experiment_main([str(tmp / "tiny.yaml")])
        yield tmp / "exp", {r.job_type: r for r in offline_runs(tmp / "exp")}, outcome
    finally:
        W.finish_wandb_run()
        configure_terminal(True)
        patch.undo()


def test_every_stage_declares_what_it_used_and_made(offline_experiment):
    exp, runs, _ = offline_experiment
    assert set(runs) == {"autoencoder", "attacker", "target", "shadow", "attack"}
    name = exp.name
    assert runs["autoencoder"].used == [f"{name}-splits"]
    assert runs["autoencoder"].made == [f"{name}-autoencoder"]
    assert runs["attacker"].made == [f"{name}-encoder"]
    for role, run_name, index in (
        ("target", "diffusion-target-000", 0),
        ("shadow", "diffusion-shadow-001", 1),
    ):
        assert runs[role].used == [f"{name}-splits", f"{name}-autoencoder"]
        assert runs[role].made == [f"{name}-{run_name}"]
        (model,) = [a for a in runs[role].artifacts if a["type"] == "model"]
        assert sorted(model["files"]) == ["card.json", "checkpoints/last.ckpt"]
        assert model["references"] == ["checkpoints/last.ckpt"]  # checksummed, not uploaded
        assert model["metadata"]["model_index"] == index  # the run card
    attack = runs["attack"]
    models = [f"{name}-diffusion-target-000", f"{name}-diffusion-shadow-001"]
    assert {f"{name}-splits", f"{name}-encoder", *models} == set(attack.used)
    assert len(attack.used) == len(set(attack.used))  # each declared once
    assert {f"{name}-query-{m.split('-', 1)[1]}" for m in models} | {f"{name}-report"} <= set(
        attack.made
    )


def test_what_a_stage_uses_is_the_version_another_made(offline_experiment):
    """Same files, same digest: W&B links the attack run to the runs that made its inputs."""
    _, runs, _ = offline_experiment

    def digests(run, used):
        return {a["name"]: a["digest"] for a in run.artifacts if a["use_after_commit"] is used}

    made = {k: v for r in runs.values() for k, v in digests(r, False).items()}
    for run in runs.values():
        for artifact, digest in digests(run, True).items():
            if artifact in made:
                assert digest == made[artifact], (run.job_type, artifact)
    linked = [a for a in digests(runs["attack"], True) if a in made]
    assert len(linked) >= 3  # target, shadow and encoder, made by their own runs


def test_runs_hold_config_splits_learning_rate_and_sample_grids(offline_experiment):
    exp, runs, outcome = offline_experiment
    splits_hash = json.loads((exp / "splits.json").read_text())["hash"]
    for role in ("autoencoder", "attacker", "target", "shadow", "attack"):
        assert runs[role].config["splits"]["hash"] == splits_hash, role
    for role in ("autoencoder", "attacker", "target", "shadow"):
        assert runs[role].config["data"]["target_size"] == 16, role
        assert any(k.startswith("lr-") for h in runs[role].history for k in h), role
    assert runs["attack"].config["attack"]["attacks"] == ["pixel"]
    media = " ".join(runs["target"].files)
    assert "media/images/samples" in media
    assert "media/images/reconstructions" in " ".join(runs["autoencoder"].files)
    assert "media/images/attack/examples" in " ".join(runs["attack"].files)
    for folder in ("diffusion-target-000", "diffusion-shadow-001"):
        assert (exp / folder / "samples.png").read_bytes()[:4] == b"\x89PNG"
    assert (exp / "autoencoder" / "reconstructions.png").is_file()
    assert (outcome.folder / "examples.png").is_file()


def test_the_sync_hint_lists_every_run_oldest_first(offline_experiment, capsys):
    from lightning_mia.attack.outcome import show_outcome

    exp, _, outcome = offline_experiment
    show_outcome(outcome)
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "wandb sync" in ln)
    paths = [Path(p) for p in line.split("wandb sync -n 1 ", 1)[1].split()]
    assert len(paths) == 5 and all(p.is_dir() for p in paths)
    # makers before users, in the order the stages ran (two runs may start within one second,
    # so the folder names' seconds do not decide it)
    stages = [p.parent.parent for p in paths]
    order = ["autoencoder", "encoder", "diffusion-target-000", "diffusion-shadow-001"]
    assert stages == [exp / name for name in order] + [exp]
