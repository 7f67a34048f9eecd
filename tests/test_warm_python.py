"""The tests' warm starts (`tests/warm_python.py`) run a command line as a fresh interpreter
would: the same output and exit code, signals passed on, nothing left running when the caller
is killed, and anything it cannot start warm started cold."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from warm_python import COLD_PYTHON, cold_reason, command, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "argv, kind",
    [
        (["train.py", "fit"], "script"),
        (["-u", "attack.py", "--ckpt", "x"], "script"),
        (["-m", "lightning_mia.cli", "fit"], "-m"),
        (["-m", "torch.distributed.run", "--nproc-per-node", "2", "train.py"], "-m"),
        (["-m", "pip", "install", "x"], None),
        (["-c", "print(1)"], None),
        (["-X", "importtime", "train.py"], None),
        (["tests/conftest.py"], None),
        (["/usr/lib/python3/dist-packages/some.py"], None),
    ],
)
def test_which_command_lines_start_warm(argv, kind, monkeypatch):
    monkeypatch.chdir(ROOT)
    got = command(argv)
    assert (got and got[0]) == kind


def test_an_environment_the_imports_would_read_differently_starts_cold():
    request = {"argv": ["train.py", "fit"], "env": {"A": "1", "OMP_NUM_THREADS": "1"}}
    assert cold_reason(request, {"A": "2"}) == ""  # read at run time, taken by the child
    for name in ("PYTHONPATH", "HF_HOME", "ATEN_CPU_CAPABILITY", "OMP_PROC_BIND"):
        assert cold_reason({**request, "env": {name: "x"}}, {}) == f"{name} differs"
    made = {"TORCHINDUCTOR_CACHE_DIR": "/tmp/t"}  # set by the server's imports: a fresh
    assert cold_reason(request, made, set(made)) == ""  # process's imports set it too
    quiet = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # what lightning_mia.terminal applies itself
    assert cold_reason({**request, "env": quiet}, {}) == ""
    assert cold_reason({**request, "argv": ["-c", "1"]}, {}) == "not a command of the package"


@pytest.fixture(scope="module")
def server():
    proc, folder = start_server(export=False)
    deadline = time.time() + 120
    while not (folder / "socket").exists() and time.time() < deadline:
        time.sleep(0.2)
    assert (folder / "socket").exists(), (folder / "server.log").read_text()
    yield folder
    stop_server((proc, folder))


def _env(**extra):
    """This environment, without the switch that makes every command cold (a cold suite run
    still checks the warm starts)."""
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_MIA_TEST_COLD"}
    return {**env, **extra}


def _run(python, *args):
    return subprocess.run(
        [str(python), *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env()
    )


@pytest.mark.slow  # the server imports the libraries (a few seconds)
def test_a_warm_command_prints_and_exits_as_a_fresh_one(server, tmp_path):
    bad = tmp_path / "missing.yaml"
    for args in (["train.py", "fit", "--config", str(bad)], ["-m", "lightning_mia.cli", "--x"]):
        warm, cold = _run(server / "python", *args), _run(COLD_PYTHON, *args)
        assert (warm.returncode, warm.stdout, warm.stderr) == (
            cold.returncode,
            cold.stdout,
            cold.stderr,
        )
        assert warm.returncode != 0 and warm.stderr.strip()
    assert (server / "server.log").read_text().count("warm ") == 2  # both ran in its children
    version = _run(server / "python", "-c", "import sys; print(sys.executable)")
    assert version.stdout.strip() == COLD_PYTHON  # `-c`: the real interpreter


CRASH = """import os, sys
if sys.argv[1] == "fds":  # how many of the descriptors named are open here
    sys.exit(print(sum(os.path.exists(f"/proc/self/fd/{fd}") for fd in sys.argv[2:])))
out = open(sys.argv[2], "w")  # left open: Python's exit writes its buffer
out.write("written before the end")
def f():
    raise ValueError("boom")
if sys.argv[1] == "exit":
    sys.exit("a message, status 1")
if sys.argv[1] == "interrupt":
    raise KeyboardInterrupt
f()
"""


@pytest.fixture
def crash_script():
    """A script in the checkout (a command of the repo, so it starts warm) that ends badly."""
    folder = ROOT / "runs" / f".warm-test-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "crash.py").write_text(CRASH)
    yield (folder / "crash.py").relative_to(ROOT)
    shutil.rmtree(folder)


@pytest.mark.slow
def test_a_warm_command_ends_badly_as_a_fresh_one(server, crash_script, tmp_path):
    """The child ends without tearing its modules down (tests/warm_child.py): an uncaught
    exception, sys.exit(message) and KeyboardInterrupt still print and end as `python`, and
    a file the script left open holds what it wrote."""
    for how, code in (("raise", 1), ("exit", 1), ("interrupt", -signal.SIGINT)):
        outs = []
        for python in (server / "python", COLD_PYTHON):
            written = tmp_path / f"{how}-{len(outs)}.txt"
            outs.append(_run(python, str(crash_script), how, str(written)))
            assert written.read_text() == "written before the end", (how, python)
        warm, cold = ((o.returncode, o.stdout, o.stderr) for o in outs)
        assert warm == cold and warm[0] == code, how
    assert "ValueError: boom" in outs[0].stderr or how != "raise"
    assert (server / "server.log").read_text().count(str(crash_script)) == 3  # all warm


@pytest.mark.slow
def test_hundreds_of_descriptors_reach_the_child(server, crash_script):
    """More than one SCM_RIGHTS message holds (a ddp_spawn rank inherits one per tensor)."""
    pipes = [os.pipe() for _ in range(300)]
    try:
        reads = [r for r, _ in pipes]
        out = subprocess.run(
            [str(server / "python"), str(crash_script), "fds", *map(str, reads)],
            cwd=ROOT,
            env=_env(),
            pass_fds=reads,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        for fd in (fd for pair in pipes for fd in pair):
            os.close(fd)
    assert (out.returncode, out.stdout) == (0, "300\n"), out.stderr[-2000:]
    log = (server / "server.log").read_text().splitlines()
    assert any(line.startswith("warm ") and f"{crash_script} fds" in line for line in log)


SPAWN = """import multiprocessing as mp, sys
mp.set_executable(sys.argv[1])
context = mp.get_context("spawn")
answers = context.SimpleQueue()
workers = [context.Process(target=answers.put, args=(i,)) for i in (1, 2)]
for worker in workers:
    worker.start()
print(sorted(answers.get() for _ in workers), [(w.join(), w.exitcode)[1] for w in workers])
"""


@pytest.mark.slow
def test_spawned_workers_start_warm_and_return_their_results(server):
    """multiprocessing's spawn (Lightning's ddp_spawn) runs its workers through the launcher:
    each starts warm, takes its pipe and the resource tracker's descriptor, and answers."""

    def spawned():
        lines = (server / "server.log").read_text().splitlines()
        return sum(line.startswith("warm ") and "spawn_main(" in line for line in lines)

    before = spawned()
    out = _run(COLD_PYTHON, "-c", SPAWN, str(server / "python"))
    assert (out.returncode, out.stdout) == (0, "[1, 2] [0, 0]\n"), out.stderr[-2000:]
    assert spawned() - before == 2


@pytest.mark.slow
def test_signals_reach_the_child_and_a_killed_caller_leaves_nothing(server, tmp_path):
    log = server / "server.log"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        before = log.read_text().count("warm ")
        args = [
            "train.py",
            "fit",
            "--config",
            "configs/encoder/tiny.yaml",
            f"--data.experiment={tmp_path / sig.name}",
            "--trainer.max_steps=100000",
        ]
        env = _env(OMP_NUM_THREADS="1")
        proc = subprocess.Popen([str(server / "python"), *args], cwd=ROOT, env=env)
        try:
            deadline = time.time() + 60
            while log.read_text().count("warm ") == before and time.time() < deadline:
                time.sleep(0.1)
            assert log.read_text().count("warm ") > before, log.read_text()
            pid = int(log.read_text().split("warm ")[-1].split(":")[0])
            time.sleep(1)
            proc.send_signal(sig)
            code = proc.wait(timeout=60)  # the launcher only passes SIGTERM on: the child ends
        finally:
            proc.kill()  # (a no-op once it has ended)
        assert code == -9 if sig == signal.SIGKILL else code != 0
        deadline = time.time() + 10
        while _alive(pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), sig


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
