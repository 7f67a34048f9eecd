"""Registration checks, paid once per file content.

Each check result is kept on disk under the content digest of what was checked (a file's sha256,
a shard's image digest), so a dataset registered again — in another experiment, under another
path, on another rank, or after a run killed part-way — checks only content it has not seen.
The cache is best effort: an unwritable cache folder means results are simply not kept.

    results = cached_map(digests, check, kind="image-file")      # digest -> check(digest)
    problems = file_image_problems(ids, path_of, name_of)        # sample id -> problem
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import PIL

from lightning_mia.data.images import image_problem
from lightning_mia.data.sources import UNREADABLE, cache_root, file_digests

log = logging.getLogger("lightning_mia.data")

CHECK_VERSION = 1  # bump when a check changes: older results are then ignored
NOT_CONTENT = ("missing", UNREADABLE)  # file_digests values that are no digest: checked uncached
CHUNK_PER_THREAD = 16  # work handed out per round; results are appended to the cache per round


class CheckCache:
    """Check results by content digest: one append-only JSON-lines file per kind of check.

    Appends survive a crash (a torn last line is skipped on reading); the decoder version is part
    of the file name, so a Pillow upgrade re-checks.
    """

    def __init__(self, kind: str) -> None:
        name = f"{kind}.v{CHECK_VERSION}.pillow-{PIL.__version__}.jsonl"
        self.path = cache_root() / "checks" / name
        self.results: dict[str, Any] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            lines = []
        for line in lines:
            try:
                digest, result = json.loads(line)
            except (ValueError, TypeError):
                continue  # a line cut short by a crash
            self.results[digest] = result

    def __contains__(self, digest: str) -> bool:
        return digest in self.results

    def __getitem__(self, digest: str) -> Any:
        return self.results[digest]

    def add(self, pairs: Iterable[tuple[str, Any]]) -> None:
        """Remember `(digest, result)` pairs, appending them to the file."""
        pairs = list(pairs)
        self.results.update(pairs)
        text = "".join(json.dumps([d, r], ensure_ascii=True) + "\n" for d, r in pairs)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as err:
            log.debug("check cache %s not written: %s", self.path, err)


def cached_map(
    keys: Sequence[str],
    compute: Callable[[str], Any],
    kind: str,
    stop_when: Callable[[Any], bool] | None = None,
    num_threads: int | None = None,
) -> dict[str, Any]:
    """`compute(key)` for each distinct content digest in `keys`, in threads, cached on disk.

    Results must be JSON values. With `stop_when`, stops after the round in which a result
    satisfies it (a cached one counts too), leaving the rest uncomputed: fail early.
    """
    cache = CheckCache(kind)
    unique = list(dict.fromkeys(keys))
    out = {k: cache[k] for k in unique if k in cache}
    if stop_when is not None and any(stop_when(v) for v in out.values()):
        return out
    todo = [k for k in unique if k not in out]
    if not todo:
        return out
    threads = num_threads or min(32, (os.cpu_count() or 1) + 4)  # files may sit on a slow disk
    with ThreadPoolExecutor(threads) as pool:  # hashing and decoding release the GIL
        step = CHUNK_PER_THREAD * threads
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            results = list(pool.map(compute, chunk))
            cache.add(zip(chunk, results))
            out.update(zip(chunk, results))
            if stop_when is not None and any(map(stop_when, results)):
                break
    return out


def file_image_problems(
    ids: Sequence[int],
    path_of: Callable[[int], Path],
    name_of: Callable[[int], str],
    stop_early: bool = False,
) -> dict[int, str]:
    """sample id -> "image NAME: problem" for each id whose image file does not decode in full.

    Files are identified by the sha256 of their bytes (`file_digests`, itself cached by size and
    mtime), so equal files are decoded once and a file seen before is not decoded again.
    """
    paths = [path_of(i) for i in ids]
    digests = file_digests(paths)
    first_path: dict[str, Path] = {}
    for path, digest in zip(paths, digests):
        if digest not in NOT_CONTENT:
            first_path.setdefault(digest, path)
    results = cached_map(
        list(first_path),
        lambda d: image_problem(first_path[d]) or "",
        kind="image-file",
        stop_when=bool if stop_early else None,
    )
    problems = {}
    for sid, path, digest in zip(ids, paths, digests):
        problem = image_problem(path) if digest in NOT_CONTENT else results.get(digest)
        if problem:
            problems[sid] = f"image {name_of(sid)}: {problem}"
    return problems
