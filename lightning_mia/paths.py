"""The experiment folder: one place that knows where every stage reads and writes.

Layout::

    runs/<experiment>/
      splits.json  autoencoder/  encoder/  captioner/  <family>-<role>-<index:03d>/
      queries/<run>/  queries/<run>@<tag>/  attack/  attack/<setting>@<tag>/

`@<tag>`: queried with other captions than the ground truth (an attacker's captioner's, the
fixed-caption or swapped-caption control; `specs.query.caption_tag`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKPOINT_DIR, LAST_CKPT = "checkpoints", "last.ckpt"
DONE_MARKER = "DONE.json"  # a training stage that finished (written by rank 0 after last.ckpt)
QUERY_COMPLETE = "COMPLETE.json"  # a query folder holding every sample of its row
# Stages that are not a text-to-image model: family name -> (folder, role)
SHARED_STAGES = {
    "autoencoder": ("autoencoder", "autoencoder"),
    "encoder": ("encoder", "attacker"),
    "captioner": ("captioner", "attacker"),
}


def role_of(model_index: int) -> str:
    """Row 0 of the splits is the target; rows 1..K are shadows."""
    if model_index < 0:
        raise ValueError(f"model_index must be >= 0, got {model_index}")
    return "target" if model_index == 0 else "shadow"


def run_name(family: str, model_index: int) -> str:
    """`{family}-{role}-{index:03d}`, e.g. `diffusion-target-000`, `seq2seq-shadow-002`."""
    return f"{family}-{role_of(model_index)}-{model_index:03d}"


def last_checkpoint(folder: str | os.PathLike) -> Path:
    """`<stage folder>/checkpoints/last.ckpt`: what every training stage writes and resumes."""
    return Path(folder) / CHECKPOINT_DIR / LAST_CKPT


def done_marker(folder: str | os.PathLike) -> Path:
    """`<stage folder>/DONE.json`: present once the stage finished; a re-run skips it."""
    return Path(folder) / DONE_MARKER


@dataclass(frozen=True)
class StagePaths:
    """Where one stage writes, its run name (W&B and folders) and its role (W&B job type)."""

    folder: Path
    name: str
    role: str


@dataclass(frozen=True)
class ExperimentLayout:
    """Paths inside one experiment folder (nothing is created until a stage writes)."""

    root: Path

    def __init__(self, root: str | os.PathLike) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def splits(self) -> Path:
        return self.root / "splits.json"

    @property
    def autoencoder(self) -> Path:
        return self.root / "autoencoder"

    @property
    def encoder(self) -> Path:
        return self.root / "encoder"

    @property
    def captioner(self) -> Path:
        return self.root / "captioner"

    @property
    def attack(self) -> Path:
        return self.root / "attack"

    def run_dir(self, family: str, model_index: int) -> Path:
        return self.root / run_name(family, model_index)

    def checkpoint(self, family: str, model_index: int) -> Path:
        """`last.ckpt` of a model run (`<family>-<role>-<index>/checkpoints/last.ckpt`)."""
        return last_checkpoint(self.run_dir(family, model_index))

    def queries(self, name: str, tag: str = "", row: int | None = None) -> Path:
        """`queries/<name><tag>/`: the caption modes of one model side by side (`tag` = ""
        for the ground-truth captions, `QuerySpec.tag`); `.../row-<row>/` for its query of
        another row's samples (a shadow's of the target's, row 0, calibrates LiRA)."""
        folder = self.root / "queries" / f"{name}{tag}"
        return folder if row is None else folder / f"row-{row:03d}"

    def report_dir(self, setting: str, tag: str = "") -> Path:
        """`attack/` for the shadow setting with ground-truth captions, else
        `attack/<setting><tag>/`."""
        if setting == "shadow" and not tag:
            return self.attack
        return self.attack / f"{setting}{tag}"

    def stage(self, family: str, model_index: int = 0) -> StagePaths:
        """Folder, run name and role of a training stage of `family` (model row `model_index`)."""
        if family in SHARED_STAGES:
            folder, role = SHARED_STAGES[family]
            return StagePaths(self.root / folder, folder, role)
        name = run_name(family, model_index)
        return StagePaths(self.root / name, name, role_of(model_index))

    def query_stage(self, model_run: str, tag: str = "") -> StagePaths:
        """The query of one model run in one caption mode (`queries/<run><tag>/`)."""
        return StagePaths(self.queries(model_run, tag), f"query-{model_run}{tag}", "query")

    def finished_runs(self, family: str, role: str = "shadow") -> list[Path]:
        """Folders of the finished (DONE) runs of `family` in `role`, by model index."""
        runs = sorted(self.root.glob(f"{family}-{role}-[0-9][0-9][0-9]"))
        return [r for r in runs if done_marker(r).is_file()]


def atomic_write_bytes(path: str | os.PathLike, data: bytes, exclusive: bool = False) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    A reader never sees a half-written file, and a crash leaves the old file (if any) intact.
    `exclusive`: never replace a file; FileExistsError when `path` exists (two processes that
    both make it: the first one's stays, the second learns it lost).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)  # atomic, and refuses an existing path
            os.unlink(tmp)
        else:
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any, exclusive: bool = False) -> None:
    """`atomic_write_bytes` for a JSON document (sorted keys, indented, trailing newline)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"), exclusive)


def write_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` on a temporary sibling of `folder`, then rename it into place.

    A reader never sees a half-written folder; an existing one is replaced only on success.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        write(tmp)
        old = None
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.old-"))
            os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def write_model_files(folder: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """`write(tmp)` into a temporary sibling, then move each file into `folder`, config.json last.

    A crash never leaves a folder that loads as a model with missing parts, and other files in
    `folder` (the stage's checkpoints/, logs) are kept.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        write(tmp)
        folder.mkdir(exist_ok=True)
        (folder / "config.json").unlink(missing_ok=True)  # not a model while files move
        names = sorted(p.name for p in tmp.iterdir() if p.name != "config.json")
        for name in [*names, "config.json"]:
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def find_config(path: str | os.PathLike) -> str:
    """`path` as given if it exists; else a relative `configs/...` path (file or folder) found
    in the installed package (`lightning_mia/configs/`, or a checkout's `configs/`)."""
    given = Path(path)
    if given.exists() or given.is_absolute() or given.parts[:1] != ("configs",):
        return str(path)
    for root in (PACKAGE_DIR, PACKAGE_DIR.parent):
        if (root / given).exists():
            return str(root / given)
    return str(path)


def with_found_configs(argv: list[str]) -> list[str]:
    """`argv` with every `--config X` / `--config=X` resolved by `find_config`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = find_config(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + find_config(arg.split("=", 1)[1])
    return out
