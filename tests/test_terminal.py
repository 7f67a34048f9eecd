"""A quiet terminal by default: the third-party lines that repeat at every stage are dropped
where they arise, the package's own lines stay, and `--verbose` brings everything back."""

import logging
import os
import subprocess
import warnings
from pathlib import Path

import pytest
from tiny_data import DATA
from warm_python import COLD_PYTHON

from lightning_mia.terminal import configure_terminal, is_verbose, verbose_requested

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def records():
    """Records reaching a handler on Lightning's and diffusers' loggers."""
    caught = []

    class Keep(logging.Handler):
        def emit(self, record):
            caught.append(record.getMessage())

    names = ["lightning.pytorch.utilities.rank_zero", "diffusers.models.modeling_utils"]
    handler = Keep(level=logging.DEBUG)
    for name in names:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    yield caught
    for name in names:
        logging.getLogger(name).removeHandler(handler)
    configure_terminal(True)


def _emit():
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try litlogger")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("[fit] encoder done in 1 s")
    logging.getLogger("diffusers.models.modeling_utils").warning(
        "Cannot initialize model with low cpu memory usage because `accelerate` was not found"
    )
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        configure_terminal(is_verbose())  # its filters go in front of "always"
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    return [str(w.message) for w in shown]


def test_quiet_drops_only_the_known_noise_and_verbose_restores_it(records):
    configure_terminal(False)
    shown = _emit()
    assert records == ["[fit] encoder done in 1 s"]
    assert shown == ["something else"]
    records.clear()
    configure_terminal(True)
    shown = _emit()
    assert len(records) == 4 and len(shown) == 2


@pytest.mark.parametrize(
    "argv, verbose",
    [
        (["fit", "--verbose"], True),
        (["fit", "--verbose", "true", "--x"], True),
        (["--verbose=false"], False),
        (["--verbose", "false"], False),
        (["--config", "a.yaml"], False),
    ],
)
def test_verbose_requested(argv, verbose):
    assert verbose_requested(argv) is verbose


def _fit_encoder(tmp_path, *extra):
    """`python -m lightning_mia.cli fit` of a tiny encoder, W&B offline; its whole output, from a
    fresh interpreter (what the imports print is part of it: not warm-started)."""
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "HOME": str(tmp_path / "home"),
        "WANDB_DIR": str(tmp_path / "wandb-home"),
        "OMP_NUM_THREADS": "1",
    }
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_SILENT"):
        env.pop(var, None)
    cmd = [
        COLD_PYTHON,
        "-m",
        "lightning_mia.cli",
        "fit",
        "--config",
        "configs/encoder/tiny.yaml",
        f"--data.experiment={tmp_path / 'exp'}",
        *DATA,
        "--trainer.max_steps=2",
        *extra,
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


@pytest.mark.slow
def test_a_stage_is_quiet_and_verbose_shows_everything(tmp_path):
    quiet = _fit_encoder(tmp_path / "quiet")
    for noise in (
        "💡",
        "GPU available",
        "Seed set to",
        "wandb:",
        "Trainable params",
        "Loading weights",
        "Writing model shards",
    ):
        assert noise not in quiet, (noise, quiet)
    assert "attacker encoder written to" in quiet  # the stage's own line stays
    verbose = _fit_encoder(tmp_path / "verbose", "--verbose")
    for line in ("💡 Tip", "GPU available", "Seed set to", "wandb:", "Trainable params"):
        assert line in verbose, (line, verbose)
    assert len(verbose.splitlines()) > 2 * len(quiet.splitlines())
