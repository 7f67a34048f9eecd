"""WebDataset tar shards as img2dataset writes them (CC3M, CC12M, LAION downloads).

    src = WebDatasetSource("cc3m/{00000..00331}.tar", resolution=256)   # or a folder, or a glob

Each shard `NNNNN.tar` holds `KEY.jpg|png|webp`, `KEY.txt` (the caption) and `KEY.json` (with
"caption" when there is no .txt). The shards are indexed once into flat arrays on disk
(`lightning_mia.data.wds_index`) that every rank and worker memory-maps; images are then read by
offset, any sample by id. The sample id is int(KEY) for numeric keys (img2dataset's), else a
stable 63-bit hash of the key; two samples with one id are an error. A shard that is not a
complete tar is refused naming it and the byte where reading stopped; with `skip_bad_samples` it
is skipped whole and recorded (`skipped_files`, then splits.json).
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lightning_mia.data.checks import cached_map
from lightning_mia.data.images import decode_image, image_problem
from lightning_mia.data.sources import (
    DataError,
    DatasetFingerprint,
    ImageCaptionSource,
    captions_digest,
    log,
    register_source,
    sha256_of_ids,
)
from lightning_mia.data.wds_index import ShardIndex, open_index
from lightning_mia.data.wds_scan import IMAGE_EXTENSIONS, key_to_id

__all__ = ["IMAGE_EXTENSIONS", "WebDatasetSource", "expand_braces", "find_shards", "key_to_id"]

BRACE = re.compile(r"\{([^{}]*)\}")


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


@register_source("webdataset")
class WebDatasetSource(ImageCaptionSource):
    """Image-caption pairs from img2dataset-style WebDataset tar shards."""

    def __init__(self, shards: str, resolution: int = 256, skip_bad_samples: bool = False) -> None:
        """
        Args:
            shards: a folder of .tar shards, a glob (`data/*.tar`) or a brace list
                (`data/{00000..00099}.tar`).
            resolution: side of the square images.
            skip_bad_samples: skip and record bad samples (and unreadable shards, whole)
                instead of raising.
        """
        super().__init__(resolution, skip_bad_samples)
        self._init_args = {
            "shards": shards,
            "resolution": resolution,
            "skip_bad_samples": skip_bad_samples,
        }
        self.shards = find_shards(shards)
        self.index: ShardIndex = open_index(self.shards)
        for k, info in enumerate(self.index.meta["shards"]):
            if info["broken"]:
                self._skip_shard(k, info["broken"])
        if not len(self.index):
            raise DataError(f"webdataset shards {shards!r}: hold no samples")
        for k, sid, text in self.index.meta["problems"]:
            self.report_bad(sid, f"{self.shards[k]}: {text}")

    def _skip_shard(self, k: int, reason: str) -> None:
        message = f"webdataset shard {self.shards[k]}: {reason}"
        if not self.skip_bad_samples:
            raise DataError(message)
        self.skipped_files[str(self.shards[k])] = message
        log.warning("skipping %s", message)

    def sample_ids(self) -> list[int]:
        return self.index.ids.tolist()

    def __len__(self) -> int:
        return len(self.index)

    def key(self, sample_id: int) -> str:
        """The WebDataset key of a sample."""
        return self.index.key(self.index.position(sample_id))

    def raw_caption(self, sample_id: int) -> object:
        return self.index.caption(self.index.position(sample_id))

    def image_name(self, sample_id: int) -> str:
        """`shard:member` of a sample's image, as messages name it."""
        pos = self.index.position(sample_id)
        return f"{self.shards[self.index.rows[pos]['shard']]}:{self.index.image_name(pos)}"

    def image_bytes(self, sample_id: int) -> bytes:
        """The encoded image of a sample, read from its shard by offset."""
        pos = self.index.position(sample_id)
        row = self.index.rows[pos]
        path = self.shards[int(row["shard"])]
        if row["size"] < 0:
            raise DataError(f"{path}: sample {self.index.key(pos)} has no image")
        size = int(row["size"])
        with open(path, "rb") as f:
            f.seek(int(row["offset"]))
            data = f.read(size)
        if len(data) < size:
            raise DataError(
                f"image {self.image_name(sample_id)}: truncated shard ({len(data)} of {size} bytes)"
            )
        return data

    def image(self, sample_id: int, resolution: int | None = None) -> torch.Tensor:
        data = self.image_bytes(sample_id)
        return decode_image(data, resolution or self.resolution, self.image_name(sample_id))

    def _shard_problems(self, k: int) -> dict[str, str]:
        """key -> problem for each image of shard `k` that does not decode in full."""
        rows = self.index.rows
        found = {}
        with open(self.shards[k], "rb") as f:
            for pos in np.flatnonzero((rows["shard"] == k) & (rows["size"] > 0)).tolist():
                f.seek(int(rows[pos]["offset"]))
                data = f.read(int(rows[pos]["size"]))
                if problem := image_problem(data):
                    found[self.index.key(pos)] = problem
        return found

    def image_problems(self, ids: Sequence[int], stop_early: bool = False) -> dict[int, str]:
        """Decode every image of every shard holding one of `ids`, once per shard content
        (cached by the shard's image digest), shards in parallel threads."""
        positions = [self.index.position(i) for i in ids]
        shard_of = [int(self.index.rows[p]["shard"]) for p in positions]
        digests = [s["images_sha256"] for s in self.index.meta["shards"]]
        shard_by_digest = {digests[k]: k for k in sorted(set(shard_of))}
        results = cached_map(
            list(shard_by_digest),
            lambda d: self._shard_problems(shard_by_digest[d]),
            kind="wds-shard-images",
            stop_when=bool if stop_early else None,
        )
        problems = {}
        for sid, pos, k in zip(ids, positions, shard_of):
            problem = results.get(digests[k], {}).get(self.index.key(pos))
            if problem:
                problems[sid] = f"image {self.image_name(sid)}: {problem}"
        return problems

    def image_digests(self, ids: Sequence[int]) -> np.ndarray:
        """Each sample's image digest, from the index (hashed while scanning)."""
        return self.index.digests[[self.index.position(i) for i in ids]]

    def captions_sha256(self) -> str:
        """As the base class, walking the index in id order (no lookup per sample)."""
        ids = self.index.ids.tolist()
        return captions_digest((sid, self.index.caption(pos)) for pos, sid in enumerate(ids))

    def dataset_fingerprint(self) -> DatasetFingerprint:
        """As the base class, with the ids left in the mapped index and the hashes kept beside
        it (the index is rebuilt whenever a shard changes, and so are they)."""
        if self._fingerprint is None:
            parts = self.index.cached("fingerprint.json", self._fingerprint_parts)
            self._fingerprint = DatasetFingerprint(self.index.ids, *parts)
        return self._fingerprint

    def _fingerprint_parts(self) -> list[str]:
        return [sha256_of_ids(self.index.ids), self.captions_sha256(), self.images_sha256()]

    def images_sha256(self) -> str:
        """Hash of every sample's image bytes, from per-shard digests taken while indexing."""
        shards = self.index.meta["shards"]
        h = hashlib.sha256()
        shard_col = self.index.rows["shard"].tolist()
        for pos, (sid, shard) in enumerate(zip(self.index.ids.tolist(), shard_col)):
            name, digest = self.index.image_name(pos), shards[shard]["images_sha256"]
            h.update(f"{sid}\t{name}\t{digest}\n".encode())
        for k, info in enumerate(shards):  # only when a shard is skipped whole
            if info["broken"]:
                h.update(f"skipped\t{self.shards[k].name}\t{info['broken']}\n".encode())
        return h.hexdigest()
