"""The whole pipeline at a small size, both families in one experiment folder.

autoencoder -> attacker's encoder -> target + shadow of each family -> queries -> attack.py,
through the real command lines. Then the query stage's guarantees on the trained models:
every sample exactly once (also under 2-process DDP), kill-and-resume equal to one run, and
one clear error per bad input.
"""

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_mia.cli import attack_main, train_main
from lightning_mia.query.run import Devices, run_query
from lightning_mia.query.shards import load_query_table, shard_paths
from lightning_mia.specs.query import QuerySpec

ROOT = Path(__file__).resolve().parents[1]
DATA = [  # small splits: 15 target queries (odd, for the DDP check), shadows of the same size
    "--data.source.num_samples=400",
    "--data.target_size=15",
    "--data.aux_size=200",
    "--data.shadow_size=15",
    "--data.public_size=150",  # the autoencoder and encoder train on it
    "--data.member_fraction=0.5",
    "--data.num_shadows=1",
    "--data.batch_size=8",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]
STEPS = {"autoencoder": 40, "encoder": 20, "diffusion": 60, "seq2seq": 60}


def fit(config, experiment, *extra):
    family = Path(config).parent.name
    args = ["fit", "--config", str(ROOT / config), f"--data.experiment={experiment}", *DATA]
    train_main([*args, f"--trainer.max_steps={STEPS[family]}", *extra])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    exp = tmp_path_factory.mktemp("exp") / "e2e"
    fit("configs/autoencoder/tiny.yaml", exp)
    fit("configs/encoder/tiny.yaml", exp)
    for family in ("diffusion", "seq2seq"):
        for index in (0, 1):
            fit(
                f"configs/{family}/tiny.yaml",
                exp,
                f"--data.model_index={index}",
                f"--model.init_args.autoencoder={exp / 'autoencoder'}",
            )
    return exp


def ckpt(exp, family, index):
    role = "target" if index == 0 else "shadow"
    return exp / f"{family}-{role}-{index:03d}" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("family", ["diffusion", "seq2seq"])
def test_attack_command_end_to_end(experiment, family, capsys):
    attack_main(
        [
            "--ckpt",
            str(ckpt(experiment, family, 0)),
            "--query.num_images=1",
            "--attack.max_epochs=5",
            "--progress=false",
            "--attack.attacks",
            '["all"]',
        ]
    )
    out = capsys.readouterr().out
    assert "blind (diagnostic)" in out and "threshold (baseline)" in out
    report = json.loads((experiment / "attack" / "report.json").read_text())
    assert report["family"] == family and report["setting"] == "shadow"
    assert report["num_shadows"] == 1 and report["num_images"] == 1
    graybox = {  # learned classifiers, the papers' statistics, complexity-calibrated scores
        "diffusion": {"loss-mlp", "secmi-mlp", "pia-mlp", "clid-mlp"}
        | {"loss-t100", "secmi-stat", "pia-t200", "clid-th"}
        | {"loss-cc", "secmi-cc", "pia-cc"},
        "seq2seq": {"nll-mlp", "nll_gap-mlp", "nll-cc"},
    }
    attacks = {"pixel", "semantic", "text", "combined", "pixel-cc"} | graybox[family]
    assert set(report["attacks"]) == attacks  # LiRA needs >= 2 shadows (a variance)
    assert any("LiRA skipped: one shadow model gives no variance" in n for n in report["notes"])
    assert (experiment / "queries" / f"{family}-shadow-001" / "row-000" / "COMPLETE.json").is_file()
    assert (experiment / "attack" / "scores.csv").is_file()
    assert set(report["baselines"]) == {"threshold", "blind"}
    for name, result in {**report["attacks"], **report["baselines"]}.items():
        assert result["access"] in ("black-box", "gray-box", "none"), name
        metrics = result["metrics"]
        for key in ("accuracy", "auc"):
            assert math.isfinite(metrics[key]["value"]), (name, key)
            assert metrics[key]["low"] <= metrics[key]["value"] <= metrics[key]["high"]
        assert metrics["tpr@1%fpr"]["resolvable"] is False  # 7 non-members < 100
    assert (experiment / "attack" / "roc.png").stat().st_size > 0
    assert "| attack" in (experiment / "attack" / "report.md").read_text()


def clear(folder):
    for path in folder.iterdir() if folder.is_dir() else []:
        if path.is_file():
            path.unlink()


def test_query_holds_every_sample_once_also_under_ddp(experiment):
    target = str(ckpt(experiment, "seq2seq", 0))
    folder = experiment / "queries" / "seq2seq-target-000"
    clear(folder)  # the attack test queried it with gray-box signals
    table = run_query(target, QuerySpec(num_images=1), progress=False)
    splits = json.loads((experiment / "splits.json").read_text())
    row = splits["rows"][0]
    expected = sorted(row["members"] + row["nonmembers"])
    assert len(expected) % 2 == 1 and table.sample_id.tolist() == expected
    assert table.is_member.tolist() == [i in row["members"] for i in expected]
    clear(folder)  # query again from scratch, with 2 processes
    run_query(
        target,
        QuerySpec(num_images=1),
        devices=Devices("cpu", 2, "ddp_spawn"),
        progress=False,
        batch_size=4,
    )
    ranks = {p.name.split("-")[1] for p in shard_paths(folder)}
    assert ranks == {"r000", "r001"}
    ddp = load_query_table(folder)
    assert ddp.sample_id.tolist() == expected
    ids = torch.cat([_ids(p) for p in shard_paths(folder)])
    assert ids.numel() == len(expected)  # nothing written twice across ranks
    # same seeds per sample: the same features up to float32 reordering (batches of 4 in 2
    # ranks, each with its own thread count, vs the default batch in one process): the VQ
    # decoder's and the features' sums give ~1e-6 relative; 1e-4 leaves room for PSNR in dB
    # and BRISQUE of 8-bit images. But sampling codes is discrete: a 1e-7 difference in a logit
    # (other kernels, other batch shapes) can flip one sampled code and so the image after it.
    # Measured: 0 of 15 samples flipped with AVX-512 kernels, 1 of 15 with AVX2 ones.
    close = torch.ones(len(expected), dtype=torch.bool)
    for name, values in table.features.items():
        same = torch.isclose(ddp.features[name], values, rtol=1e-4, atol=1e-4)
        close &= same.reshape(len(expected), -1).all(dim=1)
    assert close.sum() >= len(expected) - 1, f"features differ for samples {(~close).nonzero()}"


def _ids(path):
    from lightning_mia.query.shards import read_shard

    return read_shard(path)[0]["sample_id"]


@contextlib.contextmanager
def torch_threads(n):
    """Run the block with n intra-op threads (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def test_kill_and_resume_equals_one_run(experiment, tmp_path):
    target = ckpt(experiment, "diffusion", 1)
    folder = experiment / "queries" / "diffusion-shadow-001"
    clear(folder)
    # every run on one thread: a thread count changes how float32 sums are split (the killed
    # and the reference run differed by 1.1e-4 at 1 vs 2 threads on AVX2 kernels)
    with torch_threads(1):
        reference = run_query(str(target), QuerySpec(num_images=2), batch_size=2, progress=False)
    clear(folder)
    code = (
        "import torch\n"
        "torch.set_num_threads(1)\n"
        "from lightning_mia.query.run import run_query\n"
        "from lightning_mia.specs.query import QuerySpec\n"
        f"run_query({str(target)!r}, QuerySpec(num_images=2), batch_size=2, progress=False)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    deadline = time.time() + 120
    while len(shard_paths(folder)) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "COMPLETE.json").exists(), "the run finished before it was killed"
    partial = len(shard_paths(folder))
    assert partial >= 2
    with torch_threads(1):
        resumed = run_query(str(target), QuerySpec(num_images=2), batch_size=2, progress=False)
    assert resumed.sample_id.tolist() == reference.sample_id.tolist()
    # same thread count, same batches of 2: the same float ops (bitwise equal here on AVX-512
    # and AVX2 kernels). The margin is for kernels that choose code paths by memory alignment
    # in another process (MKL without CBWR): float32 image errors of ~1e-6 carried through the
    # features (PSNR in dB, BRISQUE of 8-bit images) stay well below 1e-4.
    for name, values in reference.features.items():
        torch.testing.assert_close(resumed.features[name], values, rtol=1e-4, atol=1e-4)


def test_bad_input_one_clear_error_each(experiment, tmp_path, capsys):
    def fails(args, needle):
        with pytest.raises(SystemExit) as err:
            attack_main(args)
        assert err.value.code != 0
        message = capsys.readouterr().err
        assert needle in message, message
        return message

    fails(["--ckpt", str(tmp_path / "none.ckpt")], "no such file")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    fails(["--ckpt", str(junk)], "not a readable checkpoint")
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {}}, plain)
    fails(["--ckpt", str(plain)], "not a lightning_mia checkpoint")
    fails(
        ["--ckpt", str(ckpt(experiment, "seq2seq", 0)), "--experiment", str(tmp_path)],
        "belongs to experiment",
    )
    fails(
        [
            "--ckpt",
            str(ckpt(experiment, "seq2seq", 0)),
            "--query.num_images=1",
            "--attack.attacks",
            '["nosuch"]',
        ],
        "nosuch",
    )
    encoder = experiment / "autoencoder" / "checkpoints" / "last.ckpt"
    fails(["--ckpt", str(encoder)], "not a target model")
    done = experiment / "diffusion-shadow-001" / "DONE.json"
    done.rename(done.with_suffix(".hidden"))
    try:
        fails(["--ckpt", str(ckpt(experiment, "diffusion", 0))], "no trained diffusion shadow")
    finally:
        done.with_suffix(".hidden").rename(done)
