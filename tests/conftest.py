"""Shared test set-up: offline, no W&B, small thread count, deterministic."""

import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SESSION_EXPERIMENTS = {"diffusion_experiment", "seq2seq_experiment", "captioner_experiment"}
# fixtures that train a model or install the package: every test that uses one is slow
SLOW_FIXTURES = SESSION_EXPERIMENTS | {"trained_autoencoder", "offline_experiment"}


# The modules that take longest (seconds of one worker, AVX2 kernels, measured with
# `--durations=0`), longest first. `make test` hands whole modules to its workers in
# collection order (`--dist loadscope --no-loadscope-reorder`): starting the long ones first
# keeps one worker from running a 100-second module alone at the end. The order changes no
# result; a module missing here runs after these, in file order.
LONGEST_FIRST = [
    "test_multi_device.py",  # 115 s (builds the diffusion session experiment)
    "test_sharded.py",  # 50 s (six 2-process training starts)
    "test_experiment_repeats.py",  # 41 s, no session experiment: the other worker's start
    "test_kill_resume.py",  # 83 s
    "test_experiment.py",  # 70 s
    "test_captioner_attack.py",  # 44 s (builds the captioner session experiment)
    "test_packaging.py",  # 32 s
    "test_end_to_end.py",  # 29 s
    "test_diffusion.py",  # 26 s (builds the trained autoencoder)
    "test_user_errors.py",  # 25 s
    "test_reporting.py",  # 25 s
    "test_diffusion_ddp.py",  # 20 s
    "test_terminal.py",  # 19 s
    "test_seq2seq_training.py",  # 18 s
    "test_external.py",  # 18 s
    "test_external_sd3.py",  # 18 s
    "test_attack_controls_audit.py",  # 17 s
    "test_cluster_docs.py",  # 16 s
    "test_cli_docs.py",  # 14 s
    "test_attack_runner.py",  # 14 s
]


def pytest_configure(config):
    """Warm starts (`tests/warm_python.py`): the controller starts the server that forks the
    suite's command lines from a process that has imported the libraries once, and every test
    process runs `sys.executable` through its launcher. Not in the fast tier (it starts no
    command line), nor with LIGHTNING_MIA_TEST_COLD=1."""
    import warm_python

    if not hasattr(config, "workerinput"):  # the controller (or the only process)
        fast = "not slow" in (config.option.markexpr or "")
        if not fast and os.environ.get("LIGHTNING_MIA_TEST_COLD") != "1":
            config._warm_server = warm_python.start_server()
    launcher = os.environ.get("LIGHTNING_MIA_TEST_LAUNCHER")
    if launcher:
        import multiprocessing

        multiprocessing.set_executable(launcher)  # ddp_spawn's workers start warm too
        sys.executable = launcher


def pytest_unconfigure(config):
    server = getattr(config, "_warm_server", None)
    if server is not None:
        import warm_python

        warm_python.stop_server(server)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(items):
    """A test that uses a fixture of SLOW_FIXTURES (a session experiment trained through the
    command lines, a trained autoencoder) is slow, marked or not. The longest modules come
    first (LONGEST_FIRST; a stable sort keeps each module's own order)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """One torch thread for every test: the models are tiny, and on a shared 2-core machine two
    threads thrash (about 10x slower). Processes the tests start set OMP_NUM_THREADS=1."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    """Keep the file-digest cache inside each test's tmp_path, and start each test with no
    image encodings or word importances kept from another (`graybox/encodings.py`)."""
    from lightning_mia.graybox.encodings import CAPTION_MEMO, MEMO

    monkeypatch.setenv("LIGHTNING_MIA_CACHE", str(tmp_path / "cache"))
    MEMO.clear()
    CAPTION_MEMO.clear()


@pytest.fixture
def log(caplog):
    """Lightning's log lines (its logger does not propagate to the root logger)."""
    logger = logging.getLogger("lightning.pytorch")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(autouse=True)
def _no_wandb_run_left_open():
    """End any W&B run a test left open (even a disabled one): a later logger would reuse it."""
    yield
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.run.finish()


def shared_build(tmp_path_factory, name, build):
    """`build(folder)`'s result, built once per test run: in a folder of the session's own
    under one process, and once for all workers under pytest-xdist (`make test` runs three): the
    first worker to ask builds it in the folder the workers share, under a file lock, and
    leaves the result pickled beside it for the others. The folder is read-only to the tests:
    what it holds is written down beside it (`<folder>.tree.json`) and checked at the end of
    the run (`pytest_sessionfinish`)."""
    import pickle

    from filelock import FileLock

    if "PYTEST_XDIST_WORKER" not in os.environ:
        folder = tmp_path_factory.mktemp(name)
        result = build(folder)
        _write_tree(folder)
        return result
    shared = tmp_path_factory.getbasetemp().parent  # pytest-of-<user>/pytest-N, all workers
    result = shared / f"{name}.pickle"
    with FileLock(str(shared / f"{name}.lock")):
        if not result.is_file():
            folder = shared / name
            folder.mkdir()
            built = build(folder)
            _write_tree(folder)
            result.write_bytes(pickle.dumps(built))
    return pickle.loads(result.read_bytes())


TREE = ".tree.json"  # beside a shared folder: {path: [size, mtime_ns]} of what it held when built


def _tree(folder):
    """{path inside `folder`: [size, mtime_ns]} of every file and folder in it ([-1, 0]: a
    folder)."""
    tree = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        tree[str(path.relative_to(folder))] = (
            [-1, 0] if path.is_dir() else [stat.st_size, stat.st_mtime_ns]
        )
    return tree


def _write_tree(folder):
    import json

    (folder.parent / f"{folder.name}{TREE}").write_text(json.dumps(_tree(folder)))


def pytest_sessionfinish(session, exitstatus):
    """The run fails when a test changed a shared folder (`shared_build`) that it should have
    copied: another worker reading or copying it at the time would see it half-written."""
    import json

    if hasattr(session.config, "workerinput"):
        return
    changed = []
    for record in sorted(session.config._tmp_path_factory.getbasetemp().glob(f"*{TREE}")):
        folder = record.with_name(record.name[: -len(TREE)])
        before, now = json.loads(record.read_text()), _tree(folder)
        changed += [
            folder / path
            for path in sorted(before.keys() | now.keys())
            if before.get(path) != now.get(path)
        ]
    if changed:
        shown = ", ".join(str(path) for path in changed[:5])
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.ensure_newline()
        reporter.write_line(
            f"error: {len(changed)} path(s) of a shared read-only test folder changed during "
            f"the run (a test must copy it first: tests/tiny_experiment.py copy_experiment): "
            f"{shown}",
            red=True,
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def trained_autoencoder(tmp_path_factory):
    """A tiny KL autoencoder shared by the autoencoder and diffusion tests: 16x16 pixels ->
    4x4x4 latents (f4), trained 300 steps (~7 s on one core) on ids 0..191 of
    ShapesSource(num_samples=256, resolution=16, seed=0) (192..255 are held out). Returns its
    diffusers folder; the initial random weights are saved next to it in `../untrained`."""
    return shared_build(tmp_path_factory, "autoencoder", _train_autoencoder)


def _train_autoencoder(root):
    import torch
    from lightning.pytorch import Trainer, seed_everything
    from torch.utils.data import DataLoader

    from lightning_mia.data.datamodule import collate_samples
    from lightning_mia.data.shapes import ShapesSource
    from lightning_mia.models.autoencoder import AutoencoderModule
    from lightning_mia.models.vae import save_autoencoder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    source = ShapesSource(num_samples=256, resolution=16, seed=0)
    items = [
        {"pixel_values": source.image(i), "caption": source.caption(i), "sample_id": i}
        for i in range(192)
    ]
    seed_everything(0)
    module = AutoencoderModule(
        kind="kl",
        resolution=16,
        block_out_channels=(16, 32, 32),
        latent_channels=4,
        norm_num_groups=8,
        lr=3e-3,
        output=str(root / "trained"),
    )
    module.ae.register_to_config(scaling_factor=1.0)
    save_autoencoder(module.ae, root / "untrained")
    loader = DataLoader(items, batch_size=16, shuffle=True, collate_fn=collate_samples)
    Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=300,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module, loader)  # on_fit_end writes root / "trained"
    torch.set_num_threads(threads)
    return root / "trained"


@pytest.fixture(scope="session")
def diffusion_experiment(tmp_path_factory):
    """The slow tier's diffusion experiment (tests/tiny_experiment.py), read-only: copy it
    (`copy_experiment`) to change it."""
    from tiny_experiment import build_diffusion

    return shared_build(tmp_path_factory, "diffusion-experiment", build_diffusion)


@pytest.fixture(scope="session")
def seq2seq_experiment(tmp_path_factory):
    """The slow tier's seq2seq experiment (trained, not queried), read-only."""
    from tiny_experiment import build_seq2seq

    return shared_build(tmp_path_factory, "seq2seq-experiment", build_seq2seq)


@pytest.fixture(scope="session")
def captioner_experiment(diffusion_experiment, tmp_path_factory):
    """A copy of the diffusion experiment with the attacker's captioner trained, read-only."""
    from tiny_experiment import build_captioner

    return shared_build(
        tmp_path_factory,
        "captioner-experiment",
        lambda folder: build_captioner(diffusion_experiment, folder),
    )


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny models on a shared 2-core machine thrash with
    two (about 10x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
