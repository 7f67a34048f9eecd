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
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from lightning_mia.data.sources import DataError, cache_root
from lightning_mia.data.wds_scan import ROW, ShardScan, scan_shard
from lightning_mia.paths import atomic_write_json

log = logging.getLogger("lightning_mia.data")

INDEX_VERSION = 1  # bump when the layout or the scan changes: older indexes are rebuilt
DTYPES = {"ids": np.dtype("<i8"), "rows": ROW, "digests": np.dtype("S16")}  # the .npy files
SORT_CHUNK = 1 << 18  # samples written per step when sorting the index by id


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
    def load(cls, folder: Path, meta: dict[str, Any] | None = None) -> ShardIndex:
        """Map an index folder read-only (`meta`: instead of reading meta.json)."""
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in DTYPES}
        arrays["captions"] = _map(folder / "captions.bin")
        arrays["keys"] = _map(folder / "keys.bin")
        if meta is None:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        return cls(arrays, meta, folder)

    def in_memory(self) -> ShardIndex:
        """A copy whose arrays live in memory (when the folder is about to go)."""
        names = ("ids", "rows", "digests", "captions", "keys")
        return ShardIndex({n: np.array(getattr(self, n)) for n in names}, self.meta, None)

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

    def cached(self, name: str, compute: Callable[[], Any]) -> Any:
        """`compute()`, kept as JSON file `name` in the index folder (best effort): for values
        that depend on the indexed shards alone, such as their fingerprint."""
        path = self.folder / name if self.folder is not None else None
        if path is not None and path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        value = compute()
        if path is not None:
            with contextlib.suppress(OSError):
                atomic_write_json(path, value)
        return value

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


def _merge(paths: Sequence[Path], out: Path, num_workers: int | None) -> None:
    """Scan every shard and write the index into folder `out`.

    Shard by shard, the arrays are appended to raw files (nothing is held for all samples but
    the ids); then they are written in id order in chunks, through memory maps.
    """
    shards, problems = [], []
    caption_base = key_base = 0
    with contextlib.ExitStack() as stack:
        raw = {name: stack.enter_context(open(out / f"{name}.raw", "wb")) for name in DTYPES}
        cap_f = stack.enter_context(open(out / "captions.bin", "wb"))
        key_f = stack.enter_context(open(out / "keys.bin", "wb"))
        for k, scan in enumerate(scan_shards(paths, num_workers)):
            shards.append({"images_sha256": scan.images_sha256, "broken": scan.broken})
            if scan.broken:
                continue
            rows = scan.rows.copy()
            rows["shard"] = k
            for start, end, base in (
                ("caption_start", "caption_end", caption_base),
                ("key_start", "key_end", key_base),
            ):
                rows[start] += base
                rows[end] += base
            caption_base += cap_f.write(scan.captions)
            key_base += key_f.write(scan.keys)
            for name, array in (("ids", scan.ids), ("rows", rows), ("digests", scan.digests)):
                raw[name].write(array.tobytes())
            problems += [[k, int(scan.ids[pos]), text] for pos, text in scan.problems]
    _write_sorted(out)
    _check_collisions(ShardIndex.load(out, meta={}), paths)
    meta = {"version": INDEX_VERSION, "shards": shards, "problems": problems}
    (out / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def _write_sorted(out: Path) -> None:
    """`<name>.raw` (shard order) -> `<name>.npy` (sample-id order), chunk by chunk."""
    ids = np.fromfile(out / "ids.raw", dtype=DTYPES["ids"])  # (N,)
    order = np.argsort(ids, kind="stable")  # (N,): equal ids keep shard order
    del ids
    for name, dtype in DTYPES.items():
        path = out / f"{name}.raw"
        if not len(order):
            np.save(out / f"{name}.npy", np.zeros(0, dtype))
        else:
            src = np.memmap(path, dtype=dtype, mode="r")
            dst = np.lib.format.open_memmap(out / f"{name}.npy", "w+", dtype, (len(order),))
            for start in range(0, len(order), SORT_CHUNK):
                dst[start : start + SORT_CHUNK] = src[order[start : start + SORT_CHUNK]]
            dst.flush()
            del src, dst
        path.unlink()


def _check_collisions(index: ShardIndex, paths: Sequence[Path]) -> None:
    """Two samples with one id: an error naming both keys and shards."""
    same = np.flatnonzero(index.ids[1:] == index.ids[:-1])
    if not len(same):
        return
    first, second = int(same[0]), int(same[0]) + 1  # sorted stably: shard order
    shard = index.rows["shard"]
    raise DataError(
        f"webdataset: sample id {int(index.ids[first])} of key {index.key(second)!r} in "
        f"{paths[shard[second]]} collides with key {index.key(first)!r} in {paths[shard[first]]}"
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
        _merge(paths, Path(tmp), num_workers)
        return ShardIndex.load(Path(tmp)).in_memory()


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
