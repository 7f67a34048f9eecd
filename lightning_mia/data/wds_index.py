"""The on-disk index of WebDataset tar shards: built once, memory-mapped by every rank.

At CC3M scale (3.3 million samples in ~330 shards) an index of Python objects costs gigabytes in
every rank and every DataLoader worker. Here each shard is scanned once with `tarfile` (shards in
parallel processes) and the result is a folder of flat numpy arrays, sorted by sample id, under
the cache folder ($LIGHTNING_MIA_CACHE/wds-index/<key>, the key covering each shard's path, size,
mtime and ctime). Every process maps it read-only: the pages are shared through the page cache,
a lookup by id is a binary search, and nothing per sample is a Python object.

    index = open_index(shard_paths)      # built under a file lock by the first process, or mapped
    pos = index.position(sample_id)      # row of the arrays
    index.rows[pos]["offset"], index.caption(pos), index.key(pos)

Scanning also checks each tar: a member running past the end of the file, or anything but the two
zero blocks that close a tar where the member headers stop, marks the shard broken, with the byte
offset where reading stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lightning_mia.data.sources import DataError, cache_root
from lightning_mia.data.wds_scan import ROW, ShardScan, scan_shard

log = logging.getLogger("lightning_mia.data")

INDEX_VERSION = 1  # bump when the layout or the scan changes: older indexes are rebuilt
ARRAYS = ("ids", "rows", "digests")  # .npy files; captions.bin and keys.bin are raw bytes


def _stamp(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except OSError:
        return [str(path.resolve()), None]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def index_key(paths: Sequence[Path]) -> str:
    """What an index is valid for: the version and each shard's path, size, mtime and ctime."""
    text = json.dumps([INDEX_VERSION, [_stamp(p) for p in paths]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _map(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, np.uint8)  # mmap refuses empty files
    return np.memmap(path, dtype=np.uint8, mode="r")


class ShardIndex:
    """Every sample of a set of shards as flat arrays (memory-mapped when loaded from disk)."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], folder: Path | None):
        self.ids: np.ndarray = arrays["ids"]  # (N,) int64, sorted
        self.rows: np.ndarray = arrays["rows"]  # (N,) ROW
        self.digests: np.ndarray = arrays["digests"]  # (N,) S16 image content digests
        self.captions: np.ndarray = arrays["captions"]  # uint8 blob
        self.keys: np.ndarray = arrays["keys"]  # uint8 blob
        self.meta, self.folder = meta, folder

    @classmethod
    def load(cls, folder: Path) -> ShardIndex:
        """Map an index folder read-only."""
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
        arrays["captions"] = _map(folder / "captions.bin")
        arrays["keys"] = _map(folder / "keys.bin")
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return cls(arrays, meta, folder)

    def __getstate__(self) -> dict[str, Any]:  # spawned workers map the folder, not a copy
        if self.folder is not None:
            return {"folder": str(self.folder)}
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "folder" in state and len(state) == 1:
            state = ShardIndex.load(Path(state["folder"])).__dict__
        self.__dict__.update(state)

    def __len__(self) -> int:
        return len(self.ids)

    def position(self, sample_id: int) -> int:
        """The row of a sample id; KeyError when the index does not hold it."""
        pos = int(np.searchsorted(self.ids, sample_id))
        if pos >= len(self.ids) or int(self.ids[pos]) != sample_id:
            raise KeyError(f"sample id {sample_id} is not in the webdataset shards")
        return pos

    def key(self, pos: int) -> str:
        row = self.rows[pos]
        return self.keys[row["key_start"] : row["key_end"]].tobytes().decode("utf-8")

    def caption(self, pos: int) -> object:
        """The caption as stored: text, a JSON value from the .json member, or None."""
        row = self.rows[pos]
        kind = int(row["caption_kind"])
        if kind == 0:
            return None
        text = self.captions[row["caption_start"] : row["caption_end"]].tobytes().decode("utf-8")
        return text if kind == 1 else json.loads(text)

    def image_name(self, pos: int) -> str:
        """The image member's name in its tar ("" when there is none)."""
        row = self.rows[pos]
        return f"{self.key(pos)}.{row['ext'].decode()}" if row["size"] >= 0 else ""


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (POSIX flock), so one process builds while the others wait."""
    try:
        import fcntl
    except ImportError:  # no flock: concurrent builders still publish atomically
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def scan_shards(paths: Sequence[Path], num_workers: int | None = None) -> Iterator[ShardScan]:
    """`scan_shard` of each path, in order; in forked processes when there are several shards."""
    workers = min(len(paths), num_workers or os.cpu_count() or 1)
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        yield from (scan_shard(p) for p in paths)
        return
    # fork: the children only parse tar files (no torch, no threads of their own)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(scan_shard, paths)


def _merge(paths: Sequence[Path], out: Path, num_workers: int | None) -> dict[str, np.ndarray]:
    """Scan every shard and write the index into folder `out`; returns the in-memory arrays."""
    ids, rows, digests, shards, problems = [], [], [], [], []
    caption_base = key_base = 0
    with open(out / "captions.bin", "wb") as cap_f, open(out / "keys.bin", "wb") as key_f:
        for k, scan in enumerate(scan_shards(paths, num_workers)):
            shards.append({"images_sha256": scan.images_sha256, "broken": scan.broken})
            if scan.broken:
                continue
            r = scan.rows.copy()
            r["shard"] = k
            for start, end, base in (("caption_start", "caption_end", caption_base),
                                     ("key_start", "key_end", key_base)):  # fmt: skip
                r[start] += base
                r[end] += base
            caption_base += cap_f.write(scan.captions)
            key_base += key_f.write(scan.keys)
            ids.append(scan.ids)
            rows.append(r)
            digests.append(scan.digests)
            problems += [[k, int(ids[-1][pos]), text] for pos, text in scan.problems]
    all_ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    order = np.argsort(all_ids, kind="stable")
    arrays = {
        "ids": all_ids[order],
        "rows": (np.concatenate(rows) if rows else np.zeros(0, ROW))[order],
        "digests": (np.concatenate(digests) if digests else np.zeros(0, "S16"))[order],
    }
    _check_collisions(arrays, out, paths)
    for name in ARRAYS:
        np.save(out / f"{name}.npy", arrays[name])
    meta = {"version": INDEX_VERSION, "shards": shards, "problems": problems}
    (out / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    return arrays


def _check_collisions(arrays: dict[str, np.ndarray], out: Path, paths: Sequence[Path]) -> None:
    same = np.flatnonzero(arrays["ids"][1:] == arrays["ids"][:-1])
    if not len(same):
        return
    keys = np.fromfile(out / "keys.bin", dtype=np.uint8)
    first, second = (arrays["rows"][int(same[0]) + d] for d in (0, 1))  # stable: shard order

    def key(row: np.void) -> str:
        return keys[row["key_start"] : row["key_end"]].tobytes().decode()

    sid = int(arrays["ids"][same[0]])
    raise DataError(
        f"webdataset: sample id {sid} of key {key(second)!r} in {paths[second['shard']]} "
        f"collides with key {key(first)!r} in {paths[first['shard']]}"
    )


def open_index(paths: Sequence[Path], num_workers: int | None = None) -> ShardIndex:
    """The index of `paths`: mapped from the cache, or built there once (others wait on a lock).
    Without a writable cache folder it is built in memory (still flat arrays), with a warning."""
    root = cache_root() / "wds-index"
    folder = root / index_key(paths)
    if (folder / "meta.json").is_file():
        return ShardIndex.load(folder)
    try:
        with _locked(root / f"{folder.name}.lock"):
            if not (folder / "meta.json").is_file():
                _build(paths, folder, num_workers)
        return ShardIndex.load(folder)
    except OSError as err:
        log.warning("webdataset index not cached (%s); building it in memory", err)
    with tempfile.TemporaryDirectory() as tmp:
        arrays = _merge(paths, Path(tmp), num_workers)
        arrays["captions"] = np.fromfile(Path(tmp) / "captions.bin", dtype=np.uint8)
        arrays["keys"] = np.fromfile(Path(tmp) / "keys.bin", dtype=np.uint8)
        meta = json.loads((Path(tmp) / "meta.json").read_text(encoding="utf-8"))
    return ShardIndex(arrays, meta, None)


def _build(paths: Sequence[Path], folder: Path, num_workers: int | None) -> None:
    """Write the index into a temporary folder beside `folder`, then rename it into place."""
    log.info("indexing %d webdataset shards into %s", len(paths), folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        _merge(paths, tmp, num_workers)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():  # not another builder's: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
