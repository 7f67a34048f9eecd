"""WebDataset tar shards as img2dataset writes them (CC3M, CC12M, LAION downloads).

    src = WebDatasetSource("cc3m/{00000..00331}.tar", resolution=256)   # or a folder, or a glob

Each shard `NNNNN.tar` holds `KEY.jpg|png|webp`, `KEY.txt` (the caption) and `KEY.json` (with
"caption" when there is no .txt). Shards are indexed once with the standard `tarfile` module;
images are then read by offset. The sample id is int(KEY) for numeric keys (img2dataset's), else a
stable 63-bit hash of the key; two samples with one id are an error.
"""

from __future__ import annotations

import glob
import hashlib
import json
import posixpath
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_mia.data.images import decode_image
from lightning_mia.data.sources import (
    DataError,
    ImageCaptionSource,
    caption_problem,
    file_digests,
    register_source,
)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
BRACE = re.compile(r"\{([^{}]*)\}")
MAX_ID = (1 << 63) - 1
END_OF_ARCHIVE = 1024  # two zero blocks close every complete tar


def expand_braces(spec: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar a/001.tar a/002.tar; `{x,y}` -> x y (nested, zero-padded)."""
    m = BRACE.search(spec)
    if not m:
        return [spec]
    body, head, tail = m.group(1), spec[: m.start()], spec[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [s for opt in options for s in expand_braces(head + opt + tail)]


def find_shards(shards: str) -> list[Path]:
    """Shard paths from a folder, a glob, a brace list or a file; `DataError` when none exist."""
    paths: list[Path] = []
    for spec in expand_braces(shards):
        p = Path(spec)
        if p.is_dir():
            paths += sorted(p.glob("*.tar"))
        elif any(c in spec for c in "*?["):
            paths += [Path(x) for x in sorted(glob.glob(spec))]
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"webdataset shard {spec}: no such file or folder")
    if not paths:
        raise DataError(f"webdataset shards {shards!r}: no .tar files found")
    return paths


def key_to_id(key: str) -> int:
    """int(key) for numeric keys, else a stable non-negative 63-bit hash of the key."""
    if key.isdigit() and int(key) <= MAX_ID:
        return int(key)
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") >> 1


@dataclass
class _Entry:
    shard: int
    key: str
    image_member: str = ""
    offset: int = 0
    size: int = 0
    caption: object = None
    caption_from: str = ""  # "txt" | "json" | "" (none)
    problem: str = ""


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tf.extractfile(member)
    return f.read() if f is not None else b""


def _index_member(tf: tarfile.TarFile, m: tarfile.TarInfo, e: _Entry, where: str) -> None:
    ext = posixpath.basename(m.name).split(".", 1)[1].lower()
    if ext in IMAGE_EXTENSIONS:
        e.image_member, e.offset, e.size = m.name, m.offset_data, m.size
    elif ext == "txt":
        try:
            e.caption, e.caption_from = _read_member(tf, m).decode("utf-8"), "txt"
        except UnicodeDecodeError:
            e.problem = f"{where}: {m.name} is not UTF-8 text"
    elif ext == "json" and e.caption_from != "txt":
        try:
            meta = json.loads(_read_member(tf, m).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            e.problem = f"{where}: {m.name}: malformed JSON ({err})"
            return
        if isinstance(meta, dict) and "caption" in meta:
            e.caption, e.caption_from = meta["caption"], "json"


def index_shard(path: Path, shard_index: int) -> list[_Entry]:
    """One pass over a tar: image offsets and captions, grouped by key, in tar order."""
    entries: dict[str, _Entry] = {}
    file_size = path.stat().st_size
    try:
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.offset_data + m.size > file_size:
                    raise DataError(
                        f"webdataset shard {path}: truncated ({m.name} needs byte "
                        f"{m.offset_data + m.size}, the file has {file_size})"
                    )
                base = posixpath.basename(m.name)
                if not m.isfile() or "." not in base or base.startswith("."):
                    continue
                key = posixpath.join(posixpath.dirname(m.name), base.split(".", 1)[0])
                e = entries.setdefault(key, _Entry(shard_index, key))
                _index_member(tf, m, e, str(path))
            if tf.offset + END_OF_ARCHIVE > file_size:  # cut exactly between two members
                raise DataError(f"webdataset shard {path}: truncated (no end-of-archive blocks)")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(
            f"webdataset shard {path}: not a readable (uncompressed) tar ({err})"
        ) from err
    return list(entries.values())


@register_source("webdataset")
class WebDatasetSource(ImageCaptionSource):
    """Image-caption pairs from img2dataset-style WebDataset tar shards."""

    def __init__(self, shards: str, resolution: int = 256, skip_bad_samples: bool = False) -> None:
        """
        Args:
            shards: a folder of .tar shards, a glob (`data/*.tar`) or a brace list
                (`data/{00000..00099}.tar`).
            resolution: side of the square images.
            skip_bad_samples: skip and record bad samples instead of raising.
        """
        super().__init__(resolution, skip_bad_samples)
        self._init_args = {
            "shards": shards,
            "resolution": resolution,
            "skip_bad_samples": skip_bad_samples,
        }
        self.shards = find_shards(shards)
        self._entries: dict[int, _Entry] = {}
        for k, path in enumerate(self.shards):
            for e in index_shard(path, k):
                self._add(e)
        self._ids = sorted(self._entries)
        if not self._ids:
            raise DataError(f"webdataset shards {shards!r}: hold no samples")
        self._by_shard: list[list[_Entry]] = [[] for _ in self.shards]
        for e in self._entries.values():
            self._by_shard[e.shard].append(e)

    def _add(self, e: _Entry) -> None:
        sid = key_to_id(e.key)
        where = f"{self.shards[e.shard]}: sample {e.key}"
        if sid in self._entries:
            other = self._entries[sid]
            raise DataError(
                f"webdataset: sample id {sid} of key {e.key!r} in {self.shards[e.shard]} "
                f"collides with key {other.key!r} in {self.shards[other.shard]}"
            )
        self._entries[sid] = e
        if e.problem:
            self.report_bad(sid, e.problem)
        elif not e.image_member:
            self.report_bad(sid, f"{where}: no image member ({'/'.join(IMAGE_EXTENSIONS)})")
        elif e.size == 0:
            self.report_bad(sid, f"{where}: image {e.image_member} is empty (0 bytes)")
        elif not e.caption_from:
            self.report_bad(sid, f"{where}: no caption (.txt or 'caption' in .json)")
        elif problem := caption_problem(e.caption):
            self.report_bad(sid, f"{where}: {problem}")

    def sample_ids(self) -> list[int]:
        return list(self._ids)

    def key(self, sample_id: int) -> str:
        """The WebDataset key of a sample."""
        return self._entries[sample_id].key

    def raw_caption(self, sample_id: int) -> object:
        return self._entries[sample_id].caption

    def image_bytes(self, sample_id: int) -> bytes:
        """The encoded image of a sample, read from its shard by offset."""
        e = self._entries[sample_id]
        path = self.shards[e.shard]
        if not e.image_member:
            raise DataError(f"{path}: sample {e.key} has no image")
        with open(path, "rb") as f:
            f.seek(e.offset)
            data = f.read(e.size)
        if len(data) < e.size:
            raise DataError(
                f"image {path}:{e.image_member}: truncated shard ({len(data)} of {e.size} bytes)"
            )
        return data

    def image(self, sample_id: int, resolution: int | None = None) -> torch.Tensor:
        e = self._entries[sample_id]
        name = f"{self.shards[e.shard]}:{e.image_member}"
        return decode_image(self.image_bytes(sample_id), resolution or self.resolution, name)

    def _shard_images_sha256(self, path: Path) -> str:
        """sha256 over the image members of one shard (captions are hashed apart)."""
        k = self.shards.index(path)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for e in sorted(self._by_shard[k], key=lambda e: e.offset):
                if e.image_member:
                    f.seek(e.offset)
                    h.update(f"{e.key}\t{e.size}\n".encode() + f.read(e.size))
        return h.hexdigest()

    def images_sha256(self) -> str:
        """Hash of every sample's image bytes, cached per shard file (keyed by size and mtime)."""
        digests = file_digests(self.shards, self._shard_images_sha256, kind="wds-images")
        h = hashlib.sha256()
        for sid in self._ids:
            e = self._entries[sid]
            h.update(f"{sid}\t{e.image_member}\t{digests[e.shard]}\n".encode())
        return h.hexdigest()
