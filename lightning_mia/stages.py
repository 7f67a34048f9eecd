"""A training stage as the runners start it: skipped when done, resumed from its last.ckpt,
and, where it must be (DDP's launcher, clusters), in its own process.

    argv = fit_arguments(folder, "configs/encoder/tiny.yaml", ["--data.experiment=runs/x"])
    if argv is not None:          # None: the stage is done (its DONE.json exists)
        run_fit_process(folder, argv)   # python -m lightning_mia.cli fit ... (= train.py fit)

Used by `lightning_mia.experiment` (which can also train in its own process) and by the
external audit (`lightning_mia.external`, whose shadows always train in their own process).
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.errors import UserError
from lightning_mia.paths import done_marker, last_checkpoint


class StageError(UserError):
    """A stage run as its own process failed (that process printed why)."""


def fit_arguments(folder: Path, config: str, args: list[str]) -> list[str] | None:
    """`train.py` arguments of the stage writing `folder` (`fit --config ... [--ckpt_path
    <its last.ckpt>]`), or None when the stage is done; logs which."""
    if done_marker(folder).is_file():
        rank_zero_info(f"[skip] {folder} is done")
        return None
    argv = ["fit", "--config", str(config), *args]
    if last_checkpoint(folder).is_file():  # interrupted: train on from where it stopped
        argv += ["--ckpt_path", str(last_checkpoint(folder))]
    rank_zero_info(f"[fit] {folder.name}: {shlex.join(argv)}")
    return argv


def run_fit_process(folder: Path, argv: list[str]) -> None:
    """Run `python -m lightning_mia.cli <argv>` (from any folder); StageError if it fails."""
    code = subprocess.run([sys.executable, "-m", "lightning_mia.cli", *argv]).returncode
    if code:
        raise StageError(f"stage {folder.name} failed (exit code {code}; its error is above)")
