"""Killed at any point and run again: the same result, no sample lost or written twice, no
half-written file — for training (killed after its 1st or 2nd checkpoint) and for the attack
stage (killed while the shadows are queried, and while the attack classifiers train).

Every run uses one thread (the in-process ones, the killed subprocesses and the session's
experiment, tests/tiny_experiment.py, whose copies these tests change), so float results are
bitwise comparable; the tiny data gives one optimizer step per epoch (8 members, batch 8), so
each checkpoint sits on an epoch boundary, where a resumed run draws exactly what an
uninterrupted one would (the global random state is saved in the checkpoint).
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
from tiny_experiment import ATTACK_EPOCHS, ATTACKS, DATA, TARGET_SIZE, TRAINER, torch_threads

from lightning_mia.cli import attack_main, train_main
from lightning_mia.experiment import fit_stage
from lightning_mia.paths import ExperimentLayout, done_marker
from lightning_mia.query.shards import load_query_table, read_shard, shard_paths

ROOT = Path(__file__).resolve().parents[1]
DIFFUSION = str(ROOT / "configs/diffusion/tiny.yaml")
ATTACK = [  # the session experiment's query (1 image, the loss signal) and attacks
    "--query.num_images=1",
    "--attack.attacks",
    *ATTACKS,
    "--query.signals",
    "loss",
    f"--attack.max_epochs={ATTACK_EPOCHS}",
    "--progress=false",
]
RUNS = ("diffusion-target-000", "diffusion-shadow-001", "diffusion-shadow-002")
TRAINED = ("splits.json", "autoencoder", "encoder", *RUNS)  # every stage, nothing queried
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


pytestmark = pytest.mark.slow  # trains and kills command lines


def _model_args(exp, index, steps):
    return [
        *DATA,
        *TRAINER,
        "--data.num_shadows=2",
        f"--data.experiment={exp}",
        f"--data.model_index={index}",
        f"--model.init_args.autoencoder={exp / 'autoencoder'}",
        f"--trainer.max_steps={steps}",
        "--checkpoint_every_n_steps=2",
        "--model.init_args.num_inference_steps=2",
    ]


@pytest.fixture(scope="module")
def base(diffusion_experiment):
    """The session's experiment: autoencoder, encoder, target and two shadows (4 steps each),
    queried (1 image) and attacked once."""
    return diffusion_experiment.layout


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


@pytest.fixture(scope="module")
def uninterrupted(base, tmp_path_factory):
    """Shadow 1's weights after 6 steps in one run (the reference of both kill points)."""
    ref = _copy(base, tmp_path_factory.mktemp("uninterrupted") / "exp")
    with torch_threads(1):  # (module fixtures are set up before _one_thread)
        train_main(["fit", "--config", DIFFUSION, *_model_args(ref.root, 1, 6)])
    return _weights(ref.checkpoint("diffusion", 1))


@pytest.mark.parametrize("kill_after", [1, 2], ids=["first-checkpoint", "second-checkpoint"])
def test_killed_training_resumes_to_the_same_weights(base, uninterrupted, tmp_path, kill_after):
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
    want, got = uninterrupted, _weights(ckpt)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "resumed weights differ"


def test_a_finished_run_continued_with_more_steps_trains_as_one_longer_run(base, tmp_path):
    """`--ckpt_path last` after a run that finished at `max_steps`, with a larger `max_steps`:
    the weights of one run of the larger count, bitwise. Batch 4 of 8 members gives 2 steps an
    epoch, so the first run ends on an epoch boundary after more than one batch, where a
    checkpoint written at the end of fit (Lightning's `save_last`) made the continued run end
    its next epoch after one batch."""
    smaller = ["--data.batch_size=4"]
    straight = _copy(base, tmp_path / "straight")
    train_main(["fit", "--config", DIFFUSION, *_model_args(straight.root, 1, 4), *smaller])
    continued = _copy(base, tmp_path / "continued")
    train_main(["fit", "--config", DIFFUSION, *_model_args(continued.root, 1, 2), *smaller])
    args = ["fit", "--config", DIFFUSION, *_model_args(continued.root, 1, 4), *smaller]
    train_main([*args, "--ckpt_path", "last"])
    want = _weights(straight.checkpoint("diffusion", 1))
    got = _weights(continued.checkpoint("diffusion", 1))
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), "continued weights differ"


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
    """The report of an attack that ran to its end on the session's queries (which were made
    in one run, on one thread, with the same query settings)."""
    layout = _copy(base, tmp_path_factory.mktemp("ref") / "exp", (*TRAINED, "queries"))
    with torch_threads(1):
        return _attack(layout)


KILL_POINTS = {  # (when to kill, what the killed run starts from)
    "while the shadows are queried": (
        lambda lay: (lay.queries("diffusion-target-000") / "COMPLETE.json").is_file(),
        TRAINED,
    ),
    "while the attacks train": (
        lambda lay: any(lay.attack.glob("*/shadow.ckpt")),
        (*TRAINED, "queries"),  # queried: the attack stage goes straight to the attacks
    ),
}


@pytest.mark.parametrize("point", KILL_POINTS, ids=list(KILL_POINTS))
def test_killed_attack_stage_gives_the_same_report(base, reference_report, tmp_path, point):
    ready, keep = KILL_POINTS[point]
    layout = _copy(base, tmp_path / "exp", keep)
    cmd = [
        sys.executable,
        str(ROOT / "attack.py"),
        "--ckpt",
        str(layout.checkpoint("diffusion", 0)),
        *ATTACK,
    ]
    _kill_when(cmd, lambda: ready(layout))
    _no_half_written_files(layout.root)
    assert _attack(layout) == reference_report
    for run in RUNS:
        folder = layout.queries(run)
        ids = torch.cat([read_shard(p)[0]["sample_id"] for p in shard_paths(folder)])
        assert ids.numel() == ids.unique().numel(), f"{run}: a sample written twice"
        table, one_run = load_query_table(folder), load_query_table(base.queries(run))
        assert len(table) == TARGET_SIZE, f"{run}: a sample lost"
        assert table.sample_id.tolist() == one_run.sample_id.tolist()
        # same thread count, same batches: the same float ops (bitwise equal here on AVX-512
        # and AVX2 kernels). The margin is for kernels that choose code paths by memory
        # alignment in another process (MKL without CBWR): float32 image errors of ~1e-6
        # carried through the features (PSNR in dB, BRISQUE of 8-bit images) stay below 1e-4.
        for name, values in one_run.features.items():
            torch.testing.assert_close(table.features[name], values, rtol=1e-4, atol=1e-4)


def test_a_copied_experiment_reuses_its_queries(base, reference_report, tmp_path):
    """`cp -r` of a queried experiment: the copy's attack reads the copied shards (their
    QuerySpec names the encoder relative to the experiment) and queries nothing again."""
    queried = _copy(base, tmp_path / "queried", (*TRAINED, "queries"))
    copy = ExperimentLayout(tmp_path / "copy")
    shutil.copytree(queried.root, copy.root)
    shutil.rmtree(queried.root)  # nothing of the original may be needed
    shards = {p: p.stat().st_mtime_ns for p in (copy.root / "queries").rglob("*.safetensors")}
    assert _attack(copy) == reference_report
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
