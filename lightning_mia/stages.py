"""Training stages as the runners start them: skipped when done, resumed from their last.ckpt,
and, where they must be (DDP's launcher, clusters), in their own process.

    argv = fit_arguments(folder, "configs/encoder/tiny.yaml", ["--data.experiment=runs/x"])
    if argv is not None:          # None: the stage is done (its DONE.json exists)
        run_fit_process(folder, argv)   # python -m lightning_mia.cli fit ... (= train.py fit)

A stage's settings are `train.py fit` arguments: the same list runs in the runner's process
(`cli.train_main`) or as its own. Used by `lightning_mia.experiment` and by the external audit
(`lightning_mia.external`, whose shadows always train in their own process).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
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
    if code or not done_marker(folder).is_file():
        raise StageError(f"stage {unfinished(folder, code)} (its error is above)")


def unfinished(folder: Path, code: int) -> str:
    """Why a stage process that returned `code` did not finish `folder`."""
    if code:
        return f"{folder.name} failed (exit code {code})"
    return f"{folder.name} stopped before it finished (no {done_marker(folder).name}; run again)"


def run_fit_processes(jobs: list[tuple[Path, list[str]]], parallel: int) -> None:
    """Run independent stages (`(folder, argv)` each) as up to `parallel` processes at once,
    each with an equal share of the CPU threads; StageError naming every one that failed.

    Tiny models gain little from a second thread, so on a small machine two stages side by
    side finish sooner than one after the other with two threads each.
    """
    parallel = max(1, min(parallel, len(jobs)))
    threads = max(1, (os.cpu_count() or 1) // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if jobs:
        names = ", ".join(folder.name for folder, _ in jobs)
        rank_zero_info(f"[fit] {names}: {parallel} at once, {threads} thread(s) each")

    def run(job: tuple[Path, list[str]]) -> str:
        folder, argv = job
        cmd = [sys.executable, "-m", "lightning_mia.cli", *argv]
        code = subprocess.run(cmd, env=env).returncode
        return unfinished(folder, code) if code or not done_marker(folder).is_file() else ""

    with ThreadPoolExecutor(parallel) as pool:
        failed = [f for f in pool.map(run, jobs) if f]
    if failed:
        raise StageError(f"stages did not finish: {'; '.join(failed)} (their errors are above)")
