"""Several devices on CPU, 2 processes (gloo).

- The experiment's attack stage on 2 devices under `ddp` (its own process, which Lightning
  re-launches), the attack command under `ddp_spawn`, and `attack.py` as `srun` starts it
  (SLURM's variables) write the report.json of one device from the same merged query tables
  (each sample queried once across the ranks, 15 of them: the ranks' shares differ); the attack
  classifiers, the report and the W&B run are rank 0's alone.
- The discriminator autoencoders' configs train under their own `strategy: ddp` at tiny sizes,
  the replicas equal after every step (dead-code restarts included).

Each multi-process run starts processes that import everything (~7 s each here), so these tests
cost tens of seconds each; they run on copies of the session's tiny experiment
(tests/tiny_experiment.py: 4 training steps per stage, 2 shadows so LiRA and its calibration
queries `queries/<shadow>/row-000/` take part), its one-device queries and report the reference.
"""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tiny_experiment import ATTACK_EPOCHS, ATTACKS, TARGET_SIZE, copy_experiment

from lightning_mia.attack.command import relaunches_command
from lightning_mia.attack.options import (
    AttackOptions,
    AttackSettings,
    ExternalTarget,
    dump_attack_options,
    parse_attack_options,
)
from lightning_mia.cli import attack_main
from lightning_mia.query.run import Devices
from lightning_mia.query.shards import load_query_table, read_shard, shard_paths
from lightning_mia.specs.query import QuerySpec
from lightning_mia.specs.signals import SignalOptions

ROOT = Path(__file__).resolve().parents[1]
NOT_RESULTS = {"created", "seconds_per_sample"}  # timings and dates differ from run to run
# Report numbers: the threshold baseline's cut is a feature value (1 float32 ulp apart here);
# accuracy and AUC are rank statistics over 15 test samples, where one changed rank moves AUC by
# 1/56 and accuracy by 1/15. 1e-4 is far above float32 noise and far below any changed result.
REPORT_TOL = 1e-4
# Features, relative to each feature's scale: one device queries 15 samples per batch, the 2
# ranks 8 and 7, which changes float32 accumulation order by a few ulps (1.2e-7) through the
# sampler and the feature networks; BRISQUE reads 8-bit images, where such a difference can
# flip one pixel's rounding (measured: 4.5e-6 of its scale). 1e-4 leaves a 20x margin.
FEATURE_TOL = 1e-4


def _env(tmp: Path, wandb: str = "disabled") -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": wandb}
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        env[var] = str(tmp / "wandb-home" / var.lower())
    return env | {"HOME": str(tmp / "home")}  # W&B writes nothing outside tmp


def _tables(exp: Path) -> dict[str, object]:
    """Every query folder's merged table (own rows and the calibration rows row-000)."""
    folders = sorted(p.parent for p in (exp / "queries").rglob("COMPLETE.json"))
    return {str(f.relative_to(exp)): load_query_table(f) for f in folders}


TARGET = "queries/diffusion-target-000"


@pytest.fixture(scope="module")
def experiment(diffusion_experiment, tmp_path_factory):
    """A copy of the session's experiment (run on one device, one thread), its report.json and
    query tables; the session's own query folders are the one-device ones (`ref-queries`)."""
    tmp = tmp_path_factory.mktemp("multi")
    copy = copy_experiment(diffusion_experiment, tmp)
    (tmp / "ref-queries").symlink_to(diffusion_experiment.root / "queries")
    report = json.loads((copy.root / "attack" / "report.json").read_text())
    return tmp, copy.root, report, _tables(copy.root)


def _fresh(tmp: Path, exp: Path, requery: list[str] | None = None) -> list[str]:
    """The one-device queries back in place less those in `requery` (None: all of them), no
    attack outputs; returns the query folders the next run will query."""
    for name in ("queries", "attack", "wandb"):
        shutil.rmtree(exp / name, ignore_errors=True)
    shutil.copytree(tmp / "ref-queries", exp / "queries")
    requery = sorted(_tables(exp)) if requery is None else requery
    for name in requery:
        for path in (exp / name).iterdir():  # a shadow's row-000/ is another query's folder
            if path.is_file():
                path.unlink()
    return requery


def _run(args: list[str], tmp: Path, wandb: str = "disabled") -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(tmp, wandb),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
    return proc


def _numbers_close(a, b, path=""):
    if isinstance(a, dict):
        keys = set(a) - NOT_RESULTS
        assert keys == set(b) - NOT_RESULTS, path
        for k in keys:
            _numbers_close(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _numbers_close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert math.isclose(a, b, rel_tol=REPORT_TOL, abs_tol=REPORT_TOL), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _same_as_one_device(exp: Path, report: dict, tables: dict, requeried: list[str]) -> None:
    """The merged tables and report.json equal the one-device run's; each folder queried
    again holds shards of both ranks and every sample exactly once."""
    got = _tables(exp)
    assert set(got) == set(tables)  # target, 2 shadows, 2 calibration folders (row-000)
    assert len(got) == 5 and sum("row-000" in k for k in got) == 2
    for name, ref in tables.items():
        table = got[name]
        assert table.sample_id.tolist() == ref.sample_id.tolist(), name
        assert table.is_member.tolist() == ref.is_member.tolist(), name
        assert set(table.features) == set(ref.features), name
        for key, values in ref.features.items():
            scale = 1.0 + float(values.abs().max())
            diff = float((table.features[key] - values).abs().max())
            assert diff <= FEATURE_TOL * scale, (name, key, diff)
    for name in requeried:
        folder = exp / name
        ranks = {p.name.split("-")[1] for p in shard_paths(folder)}
        assert ranks == {"r000", "r001"}, (name, ranks)  # both ranks queried
        ids = [i for p in shard_paths(folder) for i in read_shard(p)[0]["sample_id"].tolist()]
        assert sorted(ids) == tables[name].sample_id.tolist(), name  # each sample once
    _numbers_close(report, json.loads((exp / "attack" / "report.json").read_text()))


def _attack_py(exp: Path, *flags: str) -> list[str]:
    target = exp / "diffusion-target-000" / "checkpoints" / "last.ckpt"
    return [
        "attack.py",
        "--ckpt",
        str(target),
        "--query.num_images=1",
        "--query.signals",
        "loss",
        "--attack.attacks",
        *ATTACKS,
        f"--attack.max_epochs={ATTACK_EPOCHS}",  # as the session experiment's attack stage
        "--devices.accelerator=cpu",
        "--devices.devices=2",
        "--progress=false",
        *flags,
    ]


def test_attack_ddp_spawn_on_two_processes_writes_the_one_device_report(
    experiment, monkeypatch, capfd
):
    # ddp_spawn starts 2 fresh workers for every query, so only the target is queried again
    # (the shadows' queries are the same run_query); the command runs in this process, its
    # workers write to this process's stderr
    tmp, exp, report, tables = experiment
    requery = _fresh(tmp, exp, [TARGET])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the workers' torch threads
    attack_main(_attack_py(exp, "--devices.strategy=ddp_spawn")[1:])
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in capfd.readouterr().err
    expected = tables[TARGET].sample_id.tolist()
    assert len(expected) == TARGET_SIZE and TARGET_SIZE % 2 == 1  # unequal shares: 8 and 7
    _same_as_one_device(exp, report, tables, requery)


@pytest.mark.slow  # (as every test of the session experiment: conftest.py)
def test_attack_as_srun_starts_it_writes_the_one_device_report(experiment):
    # srun starts every task itself, with SLURM's variables (what scripts/cluster/attack.sbatch
    # gets on one node): each runs attack.py whole, Lightning's SLURMEnvironment joins them
    tmp, exp, report, tables = experiment
    requery = _fresh(tmp, exp, [TARGET])
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_NNODES": "1",
        "SLURM_NODEID": "0",
        "SLURM_JOB_NAME": "mia-attack",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODELIST": "localhost",
        "MASTER_PORT": "29541",
    }
    tasks = [
        subprocess.Popen(
            [sys.executable, *_attack_py(exp)],
            cwd=ROOT,
            text=True,
            env={**_env(tmp), **slurm, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for r in (0, 1)
    ]
    outs = [task.communicate(timeout=600) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], [err[-3000:] for _, err in outs]
    assert "shadow setting, diffusion" in outs[0][0] and not outs[1][0].strip()  # rank 0 only
    _same_as_one_device(exp, report, tables, requery)


def test_experiment_attack_stage_under_ddp_runs_as_its_own_process(
    experiment, monkeypatch, capfd, caplog
):
    """The attack stage on 2 devices under `ddp`: its own process (`-m lightning_mia.attack`),
    which Lightning re-launches for rank 1, as it does `attack.py --devices.strategy ddp`; the
    experiment command runs in this process (its lines are log records), its stage processes
    write to its stdout and stderr."""
    from wandb_offline import offline_runs

    from lightning_mia.experiment import experiment_main

    tmp, exp, report, tables = experiment
    # the target (a model on its own row) and a shadow on the target's samples (row-000):
    # each kind of query the stage makes; the shadows' other folders stay the one-device ones
    shadow = "queries/diffusion-shadow-001"
    requery = _fresh(tmp, exp, [TARGET, f"{shadow}/row-000"])
    for var, value in _env(tmp, wandb="offline").items():
        monkeypatch.setenv(var, value)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    config = str(tmp / "experiment.yaml")
    devices = ["--devices.accelerator=cpu", "--devices.devices=2", "--devices.strategy=ddp"]
    experiment_main([config, *devices])
    out, err = capfd.readouterr()
    assert "Traceback" not in err, err[-5000:]
    said = caplog.text
    assert "[attack] in its own process: -m lightning_mia.attack" in said
    assert said.count("[skip]") == 5  # the launcher re-ran the attack command, not the stages
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in err  # a second process really ran
    assert out.count("shadow setting, diffusion, 2 shadow model(s)") == 1  # shown once
    _same_as_one_device(exp, report, tables, requery)
    runs = offline_runs(exp / "wandb")  # rank 1 made a logger but no W&B run
    assert [r.job_type for r in runs] == ["attack"], [r.folder for r in runs]


def test_which_settings_relaunch_the_command_line(monkeypatch):
    assert relaunches_command(Devices("cpu", 2, "ddp"))
    assert relaunches_command(Devices("cpu", 2, "auto"))  # `devices: auto` on a multi-GPU node
    assert not relaunches_command(Devices("cpu", 2, "ddp_spawn"))
    assert not relaunches_command(Devices("cpu", 1, "auto"))
    assert not relaunches_command(Devices("cpu", "auto", "auto"))  # one CPU process
    for var, value in {
        "LOCAL_RANK": "0",
        "RANK": "0",
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "GROUP_RANK": "0",
        "TORCHELASTIC_RUN_ID": "x",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
    }.items():
        monkeypatch.setenv(var, value)  # torchrun started the ranks: nothing is re-launched
    assert not relaunches_command(Devices("cpu", 2, "ddp"))


def test_options_round_trip_through_the_stage_config(tmp_path):
    """The options of an attack stage run as its own process reach it unchanged."""
    options = AttackOptions(
        ckpt="t.ckpt",
        attack=AttackSettings(attacks=("pixel", "loss"), calibrate=False),
        query=QuerySpec(num_images=1, signals=(), signal_options=SignalOptions(secmi_t=150)),
        devices=Devices(devices=2, strategy="ddp", num_nodes=2),
        external=ExternalTarget(shadow_args="--trainer.max_steps=3", public_size=5),
    )
    config = tmp_path / "options.yaml"
    config.write_text(dump_attack_options(options))
    assert parse_attack_options(["--config", str(config)]) == options


AUTOENCODER_TINY = {  # the GPU configs' structure (discriminator, strategy ddp) at tiny sizes
    "trainer": {
        "accelerator": "cpu",
        "devices": 2,
        "max_steps": 8,
        "logger": False,
        "enable_progress_bar": False,
        # bf16 autocast is emulated on CPUs without bf16 units (~10x slower here): fp32 on CPU
        "precision": "32-true",
    },
    "model": {
        "init_args": {
            "resolution": 16,
            "block_out_channels": [8, 16],
            "layers_per_block": 1,
            "norm_num_groups": 4,
            "latent_channels": 4,
            "num_vq_embeddings": 64,
            "vq_embed_dim": 4,
            "mid_block_add_attention": False,
            "disc_start_step": 2,
            "disc_channels": 8,
            "restart_dead_codes_every": 2,
            "sample_every_n_steps": 0,
        }
    },
    "data": {
        "source": {
            "class_path": "lightning_mia.data.shapes.ShapesSource",
            "init_args": {"num_samples": 200, "resolution": 16, "seed": 0},
        },
        "num_shadows": 1,
        "target_size": 16,
        "aux_size": 64,
        "shadow_size": 16,
        "public_size": 64,
        "batch_size": 4,
        "num_workers": 0,
    },
}


@pytest.mark.slow  # 2 processes (the config's own strategy: ddp)
@pytest.mark.parametrize("config", ["kl-f8-256", "vqgan-f16-256"])
def test_discriminator_autoencoder_trains_under_plain_ddp(tmp_path, config):
    from lightning_mia.models.vae import load_autoencoder

    gpu_config = yaml.safe_load((ROOT / "configs" / "autoencoder" / f"{config}.yaml").read_text())
    assert gpu_config["trainer"]["strategy"] == "ddp"  # what the test keeps from the config
    override = json.loads(json.dumps(AUTOENCODER_TINY))
    override["data"]["experiment"] = str(tmp_path / "exp")
    probe = {
        "class_path": "tests.ddp_probe.WeightDigestCallback",
        "init_args": {"folder": str(tmp_path / "probe")},
    }
    override["trainer"]["callbacks"] = [probe]
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(override))
    proc = _run(
        [
            "train.py",
            "fit",
            "--config",
            f"configs/autoencoder/{config}.yaml",
            "--config",
            str(tmp_path / "tiny.yaml"),
        ],
        tmp_path,
    )
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr
    ranks = [json.loads((tmp_path / "probe" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the replicas hold the same weights after every step
    steps = ranks[0]
    # global_step counts optimizer steps: 1 a batch, 2 once the discriminator steps (>= 2)
    assert [s["global_step"] for s in steps] == [0, 1, 2, 4, 6, 8]
    disc = [s["discriminator"] for s in steps]
    assert disc[0] == disc[1] == disc[2] != disc[3] != disc[4]  # frozen, then trained
    assert len({s["ae"] for s in steps}) == len(steps)  # the autoencoder trains every step
    folder = tmp_path / "exp" / "autoencoder"
    assert json.loads((folder / "DONE.json").read_text())["global_step"] == 8
    ae = load_autoencoder(folder)  # rank 0 wrote the diffusers folder
    assert type(ae).__name__ == ("AutoencoderKL" if config.startswith("kl") else "VQModel")


def test_one_backward_trains_each_part_with_its_own_loss():
    import torch

    from lightning_mia.models.autoencoder import AutoencoderModule

    torch.manual_seed(0)
    module = AutoencoderModule(
        kind="kl",
        resolution=16,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        latent_channels=4,
        disc_weight=0.5,
        disc_channels=8,
    )
    x = torch.rand(2, 3, 16, 16) * 2 - 1  # (B, 3, H, W)
    rec, _, _ = module.reconstruct(x)
    rec_loss = (rec - x).abs().mean()
    g_term, d_loss, logs = module._adversarial_losses(x, rec, rec_loss)
    assert {"train/g_loss", "train/d_loss", "train/disc_weight"} <= set(logs)
    g_term.backward(retain_graph=True)  # the GAN term: the autoencoder only
    assert all(p.grad is None for p in module.discriminator.parameters())
    assert all(p.grad is not None for p in module.ae.decoder.parameters())
    module.zero_grad(set_to_none=True)
    d_loss.backward()  # the hinge loss: the discriminator only
    assert all(p.grad is None for p in module.ae.parameters())
    assert all(p.grad is not None for p in module.discriminator.parameters())
