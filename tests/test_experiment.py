"""`python -m lightning_mia.experiment`: every stage in order, skipped when done, resumed when
interrupted, and one stage in its own process (`isolate`), on a tiny experiment."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from tiny_data import DATA

from lightning_mia.experiment import experiment_main, fit_stage
from lightning_mia.paths import ExperimentLayout, done_marker, last_checkpoint
from lightning_mia.stages import StageError, fit_arguments, run_fit_processes

ROOT = Path(__file__).resolve().parents[1]
TRAINER = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]


def _config(tmp_path, steps):
    config = {
        "experiment": str(tmp_path / "exp"),
        "family": "diffusion",
        "num_shadows": 1,
        "stages": {
            "autoencoder": str(ROOT / "configs/autoencoder/tiny-kl.yaml"),
            "encoder": str(ROOT / "configs/encoder/tiny.yaml"),
            "model": str(ROOT / "configs/diffusion/tiny.yaml"),
            "data_args": DATA,
            "trainer_args": [*TRAINER, f"--trainer.max_steps={steps}"],
            "model_args": ["--model.init_args.num_inference_steps=2"],
        },
        "query": {
            "num_images": 1,
        },
        "attack": {
            "attacks": ["pixel"],
        },
    }
    path = tmp_path / f"tiny-{steps}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("experiment")
    outcomes = experiment_main([str(_config(tmp, steps=4))])
    return tmp, outcomes


def _stages(layout):
    return [
        layout.autoencoder,
        layout.encoder,
        layout.run_dir("diffusion", 0),
        layout.run_dir("diffusion", 1),
    ]


def test_every_stage_runs_in_order_and_reports(finished):
    tmp, outcomes = finished
    layout = ExperimentLayout(tmp / "exp")
    for folder in _stages(layout):
        assert json.loads(done_marker(folder).read_text())["global_step"] == 4, folder
        assert last_checkpoint(folder).is_file()
    (outcome,) = outcomes
    assert set(outcome.report.attacks) >= {"pixel"} and outcome.folder == layout.attack
    assert json.loads((layout.attack / "report.json").read_text())["num_shadows"] == 1


@pytest.fixture
def log(caplog):
    """Lightning's log lines (its logger does not propagate to the root logger)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_a_second_run_skips_every_finished_stage(finished, log):
    tmp, _ = finished
    layout = ExperimentLayout(tmp / "exp")
    before = {f: last_checkpoint(f).stat().st_mtime_ns for f in _stages(layout)}
    experiment_main([str(_config(tmp, steps=4))])
    err = log.text
    for folder in _stages(layout):
        assert f"[skip] {folder} is done" in err
        assert last_checkpoint(folder).stat().st_mtime_ns == before[folder]  # not retrained
    assert "is complete; nothing to do" in err  # the queries are not generated again


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(finished, log):
    tmp, _ = finished
    layout = ExperimentLayout(tmp / "exp")
    target = layout.run_dir("diffusion", 0)
    # as if killed after its last checkpoint, before DONE (so before any query or attack)
    done_marker(target).unlink()
    shutil.rmtree(layout.root / "queries")
    shutil.rmtree(layout.attack)
    shadow_done = done_marker(layout.run_dir("diffusion", 1)).read_text()
    experiment_main([str(_config(tmp, steps=6))])
    err = log.text
    assert f"--ckpt_path {last_checkpoint(target)}" in err
    assert "Restoring states from the checkpoint path" in err
    assert json.loads(done_marker(target).read_text())["global_step"] == 6  # 4 + 2 more
    assert done_marker(layout.run_dir("diffusion", 1)).read_text() == shadow_done  # skipped


def test_stages_run_in_their_own_processes_side_by_side(tmp_path, finished):
    config = str(ROOT / "configs/encoder/tiny.yaml")
    good, bad = ExperimentLayout(tmp_path / "a").encoder, ExperimentLayout(tmp_path / "b").encoder
    common = [*DATA, *TRAINER, "--trainer.max_steps=2"]
    jobs = [
        (good, fit_arguments(good, config, [f"--data.experiment={good.parent}", *common])),
        (
            bad,
            fit_arguments(
                bad,
                config,
                [
                    f"--data.experiment={bad.parent}",
                    *common,
                    "--model.init_args.no_such_argument=1",
                ],
            ),
        ),
    ]
    with pytest.raises(StageError, match=r"stages did not finish: encoder failed \(exit code 2\)"):
        run_fit_processes(jobs, parallel=2)
    assert json.loads(done_marker(good).read_text())["global_step"] == 2  # the other finished
    assert (good / "config.json").is_file()  # the encoder folder it writes at the end
    with pytest.raises(StageError, match="stage encoder failed"):
        fit_stage(bad, config, jobs[1][1][3:], isolate=True)
    assert fit_arguments(good, config, common) is None  # done: nothing to run
