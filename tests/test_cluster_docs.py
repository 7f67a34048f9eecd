"""The cluster scripts (`scripts/cluster/`) and the README's "Clusters" section, checked with
the real parsers and Lightning's own cluster environments, nothing submitted:

- each sbatch script runs under bash with `srun` recording the command it would start; that
  command parses (train.py: LightningCLI parse-only; attack.py: its parser), and a Lightning
  Trainer of its settings, in the environment SLURM sets for the script's `#SBATCH` lines,
  picks `SLURMEnvironment` and accepts them (tasks per node = devices, nodes = num_nodes);
- the shadows' job array covers rows 1..num_shadows of the model config, one row a task;
- `submit.sh` chains the jobs (the attack after the target and every shadow);
- `torchrun.sh`'s command parses with torchrun's own parser, and Lightning picks
  `TorchElasticEnvironment` under the variables torchrun sets; torchrun itself trains a tiny
  model on 2 CPU processes.
"""

import json
import os
import re
import shlex
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_configs import ParseOnlyCLI

from lightning_mia.attack.options import parse_attack_options
from lightning_mia.paths import with_found_configs
from lightning_mia.query.run import Devices, query_trainer

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "scripts" / "cluster"
SBATCH_SCRIPTS = sorted(CLUSTER.glob("*.sbatch"))
RECORDED = ("srun", "sbatch", "torchrun")  # stand-ins print their arguments instead


def dry_run(script: Path, tmp: Path, env: dict[str, str]) -> dict[str, list[list[str]]]:
    """Run `script` with bash from a copy of the working folder (its `logs/` go there), each
    of `srun`, `sbatch`, `torchrun` replaced by a function that records its arguments."""
    (tmp / "scripts").exists() or (tmp / "scripts").symlink_to(ROOT / "scripts")
    record = tmp / "calls.jsonl"
    record.unlink(missing_ok=True)
    stubs = "".join(
        f"{name}() {{ python3 -c 'import json, sys; print(json.dumps([sys.argv[1]] + "
        f'sys.argv[2:]))\' {name} "$@" >> {shlex.quote(str(record))}; echo 4242; }}\n'
        for name in RECORDED
    )
    code = f"{stubs}set -- ; source {shlex.quote(str(script))}"
    proc = subprocess.run(
        ["bash", "-c", code],
        cwd=tmp,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, (script.name, proc.stderr)
    calls: dict[str, list[list[str]]] = {name: [] for name in RECORDED}
    for line in record.read_text().splitlines() if record.is_file() else []:
        name, *args = json.loads(line)
        calls[name].append(args)
    return calls


def sbatch_options(script: Path) -> dict[str, str]:
    """The `#SBATCH --key=value` lines of a script."""
    lines = re.findall(r"^#SBATCH\s+--([\w-]+)(?:[= ](\S+))?", script.read_text(), flags=re.M)
    return {key: value for key, value in lines}


def slurm_env(options: dict[str, str], task: int | None = None) -> dict[str, str]:
    """What SLURM sets for rank 0 of a job with these `#SBATCH` options."""
    nodes, per_node = int(options.get("nodes", 1)), int(options["ntasks-per-node"])
    env = {
        "SLURM_JOB_NAME": options["job-name"],
        "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_NTASKS": str(nodes * per_node),
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NODELIST": f"gpu[001-{nodes:03d}]",
        "SLURM_SUBMIT_DIR": "",  # the dry run's folder (cwd)
    }
    if task is not None:
        env |= {"SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": str(task)}
    return env


@contextmanager
def environment(env: dict[str, str]):
    """os.environ with `env` added, restored afterwards (Lightning reads it when it builds)."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def parsed_stage(argv: list[str]) -> tuple[str, object]:
    """("train", the fit config) or ("attack", AttackOptions) of `python train.py|attack.py ...`."""
    assert argv[0] == "python", argv
    if argv[1] == "train.py":
        assert argv[2] == "fit", argv
        return "train", ParseOnlyCLI(args=with_found_configs(argv[2:])).config.fit
    assert argv[1] == "attack.py", argv
    return "attack", parse_attack_options(with_found_configs(argv[2:]))


def lightning_environment(kind: str, parsed, env: dict[str, str]):
    """The cluster environment a Trainer of the command's settings picks under `env`, after
    it has checked the settings against it (as Lightning does before it starts)."""
    d = parsed.trainer if kind == "train" else parsed.devices
    settings = Devices("cpu", d.devices, d.strategy, d.num_nodes)  # cpu: same ranks, no GPU here
    with environment(env):
        trainer = query_trainer(settings)
        cluster = trainer.strategy.cluster_environment
        devices, nodes = trainer.num_devices, trainer.num_nodes  # "8" on a command line: 8
        cluster.validate_settings(num_devices=devices, num_nodes=nodes)
        assert cluster.world_size() == devices * nodes
    return cluster


@pytest.mark.parametrize("script", SBATCH_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_script_runs_commands_lightning_accepts_under_slurm(script, tmp_path):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    options = sbatch_options(script)
    assert options["job-name"] not in ("bash", "interactive")  # Lightning would ignore SLURM
    tasks = [None]
    if "array" in options:
        first, last = map(int, options["array"].split("-"))
        tasks = list(range(first, last + 1))
    for task in tasks:
        env = slurm_env(options, task)
        calls = dry_run(script, tmp_path, env)
        assert calls["srun"], f"{script.name}: no srun"  # srun starts one task per device
        for argv in calls["srun"]:
            kind, parsed = parsed_stage(argv)
            cluster = lightning_environment(kind, parsed, env)
            assert isinstance(cluster, SLURMEnvironment), (script.name, type(cluster))
            if kind == "train" and task is not None:  # the array: task K trains row K
                assert parsed.data.model_index == task
                assert (first, last) == (1, parsed.data.num_shadows), options["array"]


def test_submit_chains_the_jobs(tmp_path):
    submissions = dry_run(CLUSTER / "submit.sh", tmp_path, {})["sbatch"]
    scripts = [Path(args[-1]).name for args in submissions]
    assert scripts == ["shared.sbatch", "target.sbatch", "shadows.sbatch", "attack.sbatch"]
    assert all((ROOT / args[-1]).is_file() for args in submissions)
    dependencies = [
        next((a for a in args if a.startswith("--dependency")), "") for args in submissions
    ]
    assert dependencies == [
        "",
        "--dependency=afterok:4242",
        "--dependency=afterok:4242",
        "--dependency=afterok:4242:4242",
    ]


def torchrun_env(args) -> dict[str, str]:
    """What torchrun sets for its first process (rank 0 of node 0)."""
    nnodes, nproc = int(args.nnodes), int(args.nproc_per_node)
    return {
        "RANK": "0",
        "LOCAL_RANK": "0",
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(nnodes * nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "TORCHELASTIC_RUN_ID": "none",
        "MASTER_ADDR": args.master_addr,
        "MASTER_PORT": str(args.master_port),
    }


@pytest.mark.parametrize("nnodes, index", [("1", "0"), ("2", "0"), ("2", "3")])
def test_torchrun_script_runs_commands_lightning_accepts(tmp_path, nnodes, index):
    from lightning.fabric.plugins.environments import TorchElasticEnvironment
    from torch.distributed.run import get_args_parser

    env = {"NNODES": nnodes, "INDEX": index, "NODE_RANK": "0", "MASTER_ADDR": "node0"}
    (argv,) = dry_run(CLUSTER / "torchrun.sh", tmp_path, env)["torchrun"]
    args = get_args_parser().parse_args(argv)  # torchrun's own parser
    assert args.training_script == "train.py" and int(args.nnodes) == int(nnodes)
    kind, parsed = parsed_stage(["python", args.training_script, *args.training_script_args])
    assert parsed.data.model_index == int(index) and parsed.trainer.num_nodes == int(nnodes)
    cluster = lightning_environment(kind, parsed, torchrun_env(args))
    assert isinstance(cluster, TorchElasticEnvironment)


@pytest.mark.slow
def test_torchrun_trains_on_two_cpu_processes(tmp_path):
    exp = tmp_path / "exp"
    argv = [
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29531",
        "train.py",
        "fit",
        "--config",
        "configs/encoder/tiny.yaml",
        f"--data.experiment={exp}",
        "--data.source.num_samples=300",
        "--data.target_size=16",
        "--data.aux_size=160",
        "--data.shadow_size=16",
        "--data.public_size=100",
        "--data.batch_size=4",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_steps=3",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr
    assert json.loads((exp / "encoder" / "DONE.json").read_text())["global_step"] == 3


def clusters_section() -> str:
    """The README's "## Clusters" section."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"^## Clusters\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, "README has no '## Clusters' section"
    return match.group(1)


def section_commands() -> list[list[str]]:
    """The command lines of the section's code blocks (continuations joined, comments and
    leading VAR=value assignments dropped)."""
    blocks = re.findall(r"```(?:sh|bash)\n(.*?)```", clusters_section(), flags=re.S)
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words = words[1:]
            if words:
                commands.append(words)
    return commands


def test_readme_clusters_section_commands_parse():
    from torch.distributed.run import get_args_parser

    programs = set()
    for words in section_commands():
        program, args = words[0], words[1:]
        programs.add(program)
        if program in ("sbatch", "bash"):
            script = next(a for a in args if a.startswith("scripts/"))
            assert (ROOT / script).is_file(), words
        elif program == "srun":
            parsed_stage(args[args.index("python") :])  # srun's own flags before it
        elif program == "torchrun":
            run = get_args_parser().parse_args(args)
            parsed_stage(["python", run.training_script, *run.training_script_args])
        else:
            assert program == "python", words
            parsed_stage(words)
    assert {"sbatch", "srun", "torchrun"} <= programs, programs
