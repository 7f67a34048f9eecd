"""Killed at any point and run again: the same result, no sample lost or written twice, no
half-written file — for training (killed after its 1st or 2nd checkpoint) and for the attack
stage (killed while the shadows are queried, and while the attack classifiers train).

Every run uses one thread (the in-process ones and the killed subprocesses alike), so float
results are bitwise comparable; the tiny data gives one optimizer step per epoch, so each
checkpoint sits on an epoch boundary, where a resumed run draws exactly what an uninterrupted
one would (the global random state is saved in the checkpoint).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_mia.cli import attack_main, train_main
from lightning_mia.experiment import fit_stage
from lightning_mia.paths import ExperimentLayout, done_marker
from lightning_mia.query.shards import load_query_table, read_shard, shard_paths

ROOT = Path(__file__).resolve().parents[1]
DIFFUSION = str(ROOT / "configs/diffusion/tiny.yaml")
DATA = [
    "--data.source.num_samples=200",
    "--data.target_size=16",  # 8 members: one batch, one step per epoch
    "--data.aux_size=64",
    "--data.shadow_size=16",
    "--data.public_size=64",
    "--data.member_fraction=0.5",
    "--data.num_shadows=2",
    "--data.batch_size=8",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
]
ATTACK = [
    "--query.num_images=1",
    "--attack.attacks",
    "pixel",
    "--query.signals",
    "loss",
    "--attack.max_epochs=40",
    "--progress=false",
]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model_args(exp, index, steps):
    return [
        *DATA,
        f"--data.experiment={exp}",
        f"--data.model_index={index}",
        f"--model.init_args.autoencoder={exp / 'autoencoder'}",
        f"--trainer.max_steps={steps}",
        "--checkpoint_every_n_steps=2",
        "--model.init_args.num_inference_steps=2",
    ]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An experiment with its autoencoder, encoder, target and two shadows (4 steps each)."""
    torch.set_num_threads(1)
    exp = tmp_path_factory.mktemp("kill") / "exp"
    common = [*DATA, f"--data.experiment={exp}", "--trainer.max_steps=4"]
    train_main(["fit", "--config", str(ROOT / "configs/autoencoder/tiny-kl.yaml"), *common])
    train_main(["fit", "--config", str(ROOT / "configs/encoder/tiny.yaml"), *common])
    for index in range(3):
        train_main(["fit", "--config", DIFFUSION, *_model_args(exp, index, 4)])
    return ExperimentLayout(exp)


def _copy(layout, dest, keep=("splits.json", "autoencoder", "encoder")):
    dest.mkdir(parents=True)
    for name in keep:
        src = layout.root / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dest / name)
    return ExperimentLayout(dest)


def _kill_when(cmd, ready, timeout=300):
    """Start `cmd`, SIGKILL it as soon as `ready()` holds; fail if it finished first."""
    proc = subprocess.Popen(cmd, env=ONE_THREAD, cwd=ROOT)
    deadline = time.time() + timeout
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _no_half_written_files(folder):
    leftovers = [p for p in Path(folder).rglob("*") if ".tmp" in p.name or p.name.endswith("~")]
    assert leftovers == []


def _weights(ckpt):
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("kill_after", [1, 2], ids=["first-checkpoint", "second-checkpoint"])
def test_killed_training_resumes_to_the_same_weights(base, tmp_path, kill_after):
    ref = _copy(base, tmp_path / "ref")
    train_main(["fit", "--config", DIFFUSION, *_model_args(ref.root, 1, 6)])
    killed = _copy(base, tmp_path / "killed")
    ckpt = killed.checkpoint("diffusion", 1)
    saves = []

    def saved_enough():  # count the distinct versions of last.ckpt written so far
        if ckpt.is_file() and (not saves or ckpt.stat().st_mtime_ns != saves[-1]):
            saves.append(ckpt.stat().st_mtime_ns)
        return len(saves) >= kill_after

    cmd = [
        sys.executable,
        "-m",
        "lightning_mia.cli",
        "fit",
        "--config",
        DIFFUSION,
        *_model_args(killed.root, 1, 6),
    ]
    _kill_when(cmd, saved_enough)
    run = killed.run_dir("diffusion", 1)
    assert not done_marker(run).exists()
    _no_half_written_files(run)
    fit_stage(run, DIFFUSION, _model_args(killed.root, 1, 6), isolate=False)  # the resume
    assert json.loads(done_marker(run).read_text())["global_step"] == 6
    want, got = _weights(ref.checkpoint("diffusion", 1)), _weights(ckpt)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed weights differ"


def _attack(layout):
    attack_main(["--ckpt", str(layout.checkpoint("diffusion", 0)), *ATTACK])
    report = json.loads((layout.attack / "report.json").read_text())
    for key in ("created",):
        report.pop(key)
    for section in ("attacks", "baselines"):
        for entry in report[section].values():
            entry.pop("seconds_per_sample")
    return report


@pytest.fixture(scope="module")
def reference_report(base, tmp_path_factory):
    keep = (
        "splits.json",
        "autoencoder",
        "encoder",
        *(base.run_dir("diffusion", i).name for i in range(3)),
    )
    layout = _copy(base, tmp_path_factory.mktemp("ref") / "exp", keep)
    return _attack(layout), keep


KILL_POINTS = {
    "while the shadows are queried": lambda lay: (
        lay.queries("diffusion-target-000") / "COMPLETE.json"
    ).is_file(),
    "while the attacks train": lambda lay: any(lay.attack.glob("*/shadow.ckpt")),
}


@pytest.mark.parametrize("point", KILL_POINTS, ids=list(KILL_POINTS))
def test_killed_attack_stage_gives_the_same_report(base, reference_report, tmp_path, point):
    want, keep = reference_report
    layout = _copy(base, tmp_path / "exp", keep)
    cmd = [
        sys.executable,
        str(ROOT / "attack.py"),
        "--ckpt",
        str(layout.checkpoint("diffusion", 0)),
        *ATTACK,
    ]
    _kill_when(cmd, lambda: KILL_POINTS[point](layout))
    _no_half_written_files(layout.root)
    assert _attack(layout) == want
    for run in ("diffusion-target-000", "diffusion-shadow-001", "diffusion-shadow-002"):
        folder = layout.queries(run)
        ids = torch.cat([read_shard(p)[0]["sample_id"] for p in shard_paths(folder)])
        assert ids.numel() == ids.unique().numel(), f"{run}: a sample written twice"
        assert len(load_query_table(folder)) == 16, f"{run}: a sample lost"


def test_a_copied_experiment_reuses_its_queries(base, reference_report, tmp_path):
    """`cp -r` of a queried experiment: the copy's attack reads the copied shards (their
    QuerySpec names the encoder relative to the experiment) and queries nothing again."""
    want, keep = reference_report
    queried = _copy(base, tmp_path / "queried", keep)
    assert _attack(queried) == want
    copy = ExperimentLayout(tmp_path / "copy")
    shutil.copytree(queried.root, copy.root)
    shutil.rmtree(queried.root)  # nothing of the original may be needed
    shutil.rmtree(copy.attack)
    shards = {p: p.stat().st_mtime_ns for p in (copy.root / "queries").rglob("*.safetensors")}
    assert _attack(copy) == want
    after = {p: p.stat().st_mtime_ns for p in (copy.root / "queries").rglob("*.safetensors")}
    assert after == shards  # not one shard written again


def test_a_copied_experiment_reads_its_own_autoencoder(base, tmp_path):
    # the checkpoint names <base>/autoencoder; in a copy it must read the copy's, so the
    # copy still works when the original is gone (and never mixes the two)
    from lightning_mia.models.registry import load_family_module

    layout = _copy(base, tmp_path / "exp", ("splits.json", "autoencoder", "diffusion-target-000"))
    model = load_family_module(layout.checkpoint("diffusion", 0))
    assert Path(model.card.experiment) == layout.root
    assert Path(model.card.autoencoder) == layout.root / "autoencoder"
    assert Path(model.hparams.autoencoder) == layout.root / "autoencoder"


def test_sigterm_stops_training_with_a_failing_status(base, tmp_path):
    # Lightning ends a run sent SIGTERM with exit status 0; a scheduler or the experiment
    # runner would take it for finished. It must fail (143), resumable, with no DONE marker.
    layout = _copy(base, tmp_path / "exp")
    folder = layout.run_dir("diffusion", 0)
    argv = ["fit", "--config", DIFFUSION, *_model_args(layout.root, 0, 400)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lightning_mia.cli", *argv],
        env=ONE_THREAD,
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (folder / "checkpoints" / "last.ckpt").is_file() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    assert "stopped by SIGTERM" in err.splitlines()[-1] and "Traceback" not in err
    assert not done_marker(folder).is_file()
