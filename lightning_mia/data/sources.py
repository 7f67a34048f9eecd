"""Image-caption sources: one small interface over every dataset format, plus a registry.

A source lists sample ids, gives each id's caption and image (3, R, R) in [-1, 1], and a
fingerprint of its content (ids, captions, image bytes) that splits.json records so a changed
dataset is refused later. Bad input raises one `DataError` naming the file and the problem; with
`skip_bad_samples=True` the sample is skipped instead, logged and kept in `bad_samples` (a file
skipped whole, such as an unreadable tar shard, in `skipped_files`).

Registering a dataset (`make_splits`) calls `verify()`: every caption must be usable text and
every image must decode in full (`image_problems`, in parallel and cached by file content, see
`lightning_mia.data.checks`); `image_digests` gives each sample's image content digest, from
which duplicates are found.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from lightning_mia.errors import UserError
from lightning_mia.paths import atomic_write_json
from lightning_mia.registry import Registry

log = logging.getLogger("lightning_mia.data")

SOURCES: Registry[type[ImageCaptionSource]] = Registry("source", plugins="lightning_mia.data")
CACHE_ENV = "LIGHTNING_MIA_CACHE"  # folder for the file-digest cache (default ~/.cache/...)
HASH_CHUNK = 1 << 20
CHECK_RESOLUTION = 8  # the registration check converts and resizes too, at this side
DIGEST_BYTES = 16  # per-sample image digests (duplicate detection): the first 16 bytes of sha256


class DataError(UserError):
    """Bad input data: the message names the file (or sample) and what is wrong with it."""


def register_source(name: str) -> Callable[[type], type]:
    """Class decorator: make a source buildable by `name` (see `build_source`)."""

    def wrap(cls: type) -> type:
        cls.registry_name = name
        return SOURCES.register(name, cls)

    return wrap


def build_source(description: dict[str, Any]) -> ImageCaptionSource:
    """Rebuild a source from `source.describe()` (e.g. the `dataset.source` of splits.json)."""
    return SOURCES[description.get("name")](**description.get("init_args", {}))


def caption_problem(value: object) -> str | None:
    """Why `value` is not a usable caption, or None when it is one."""
    if not isinstance(value, str):
        return f"caption is not text (got {type(value).__name__})"
    if not value.strip():
        return "caption is empty"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. "\ud800" in JSON: no tokenizer takes it
        return "caption is not valid Unicode (lone surrogate)"
    if not any(c.isprintable() and not c.isspace() for c in value):
        return "caption has no printable characters"
    return None


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file; `DataError` naming it when missing or malformed."""
    if not path.is_file():
        raise DataError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{what} {path}: malformed JSON ({err})") from err


def encode_ids(ids: Sequence[int]) -> str:
    """Sorted int ids -> compact text (delta-coded int64, zlib, base64) for splits.json."""
    arr = np.sort(np.asarray(ids, dtype=np.int64))
    deltas = np.diff(arr, prepend=np.int64(0)).astype("<i8")
    return base64.b64encode(zlib.compress(deltas.tobytes(), 9)).decode("ascii")


def decode_ids(text: str) -> list[int]:
    """Inverse of `encode_ids`."""
    deltas = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<i8")
    return np.cumsum(deltas).tolist()


@dataclass(frozen=True, eq=False)
class DatasetFingerprint:
    """What a dataset held: its ids and hashes of its captions and image bytes."""

    ids: Sequence[int]  # a tuple, or (millions of samples) a read-only int64 array
    ids_sha256: str
    captions_sha256: str
    images_sha256: str

    @property
    def digest(self) -> str:
        """One sha256 over ids, captions and images: `source.fingerprint()`."""
        text = f"ids:{self.ids_sha256}|captions:{self.captions_sha256}|images:{self.images_sha256}"
        return hashlib.sha256(text.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.digest,
            "num_samples": len(self.ids),
            "ids": encode_ids(self.ids),
            "ids_sha256": self.ids_sha256,
            "captions_sha256": self.captions_sha256,
            "images_sha256": self.images_sha256,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DatasetFingerprint:
        return cls(
            tuple(decode_ids(d["ids"])), d["ids_sha256"], d["captions_sha256"], d["images_sha256"]
        )

    def describe_change(self, new: DatasetFingerprint) -> str:
        """What changed from `self` (stored) to `new` (now), in words; "" when nothing did."""
        if new.digest == self.digest:
            return ""
        old_ids, new_ids = set(self.ids), set(new.ids)
        added, removed = len(new_ids - old_ids), len(old_ids - new_ids)
        if added or removed:
            return f"{added} sample ids added, {removed} removed ({len(new_ids)} now)"
        changed = []
        if new.captions_sha256 != self.captions_sha256:
            changed.append("captions")
        if new.images_sha256 != self.images_sha256:
            changed.append("image bytes")
        return f"same {len(new_ids)} sample ids, but the {' and '.join(changed)} changed"


def captions_digest(pairs: Iterable[tuple[int, object]]) -> str:
    """sha256 over (sample id, caption as stored) pairs, in id order: the fingerprint's part."""
    h = hashlib.sha256()
    for sid, caption in pairs:
        raw = json.dumps(caption, ensure_ascii=False, default=repr)
        h.update(f"{sid}\t{raw}\n".encode("utf-8", "surrogatepass"))  # bad text hashes too
    return h.hexdigest()


def sha256_of_ids(ids: Sequence[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


UNREADABLE = "unreadable"  # the digest of a file that exists but cannot be read (never cached)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                h.update(chunk)
    except OSError:
        return UNREADABLE
    return h.hexdigest()


def cache_root() -> Path:
    """The folder of lightning_mia's caches: $LIGHTNING_MIA_CACHE, else ~/.cache/lightning_mia."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lightning_mia")


def _cache_file(folder: Path, kind: str) -> Path:
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()
    return cache_root() / "file_digests" / f"{key}.{kind}.json"


def file_digests(
    paths: Sequence[Path],
    digest: Callable[[Path], str] = _file_sha256,
    kind: str = "sha256",
    num_threads: int = 8,
) -> list[str]:
    """`digest(path)` of each file, by default the sha256 of its bytes ("missing" if absent,
    `UNREADABLE` if it cannot be read).

    Digests are cached per folder and `kind`, keyed by (size, mtime_ns), so a big dataset is read
    once and a file rewritten since is read again. The cache is best effort (unwritable: uncached).
    """
    out: dict[Path, str] = {}
    by_folder: dict[Path, list[Path]] = {}
    for p in paths:
        by_folder.setdefault(p.parent, []).append(p)
    for folder, files in by_folder.items():
        cache_path = _cache_file(folder, kind)
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
        todo, keys = [], {}
        for p in files:
            try:
                st = p.stat()
            except OSError:
                out[p] = "missing"
                continue
            keys[p] = [st.st_size, st.st_mtime_ns]
            hit = cache.get(p.name)
            if hit and hit[:2] == keys[p]:
                out[p] = hit[2]
            else:
                todo.append(p)
        with ThreadPoolExecutor(num_threads) as pool:  # hashlib releases the GIL
            for p, value in zip(todo, pool.map(digest, todo)):
                out[p] = value
                if value != UNREADABLE:  # a permission fixed later keeps size and mtime
                    cache[p.name] = [*keys[p], value]
        if todo:
            try:
                atomic_write_json(cache_path, cache)
            except OSError:
                pass
    return [out[p] for p in paths]


class ImageCaptionSource(ABC):
    """A dataset of (image, caption) pairs keyed by integer sample id.

    Subclasses list their samples in `sample_ids()`, give `raw_caption` (as stored, possibly
    bad, for the fingerprint), `caption`, `image` and `images_sha256`. Everything else is here.
    """

    registry_name: ClassVar[str] = ""

    def __init__(self, resolution: int, skip_bad_samples: bool = False) -> None:
        if not isinstance(resolution, int) or resolution < 1:
            raise DataError(f"resolution must be a positive int, got {resolution!r}")
        self.resolution = resolution
        self.skip_bad_samples = skip_bad_samples
        self.bad_samples: dict[int, str] = {}  # sample_id -> reason, in skip mode
        self.skipped_files: dict[str, str] = {}  # file skipped whole (e.g. a shard) -> reason
        self._init_args: dict[str, Any] = {}
        self._fingerprint: DatasetFingerprint | None = None

    # ---- what each format provides ----
    @abstractmethod
    def sample_ids(self) -> list[int]:
        """Every sample id the dataset lists, sorted (bad samples included)."""

    @abstractmethod
    def raw_caption(self, sample_id: int) -> object:
        """The caption as stored (may be bad); hashed into the fingerprint."""

    @abstractmethod
    def image(self, sample_id: int, resolution: int | None = None) -> torch.Tensor:
        """The image as a float tensor (3, R, R) in [-1, 1]; R = `resolution` or the source's."""

    @abstractmethod
    def images_sha256(self) -> str:
        """One sha256 over the image content of every sample (file bytes, or what defines it)."""

    # ---- shared behaviour ----
    def caption(self, sample_id: int) -> str:
        """The caption text (stripped); `DataError` if it is not usable text."""
        raw = self.raw_caption(sample_id)
        problem = caption_problem(raw)
        if problem:
            raise DataError(f"sample {sample_id} of {self}: {problem}")
        return raw.strip()

    def valid_ids(self) -> list[int]:
        """`sample_ids()` minus the samples found bad so far."""
        return [i for i in self.sample_ids() if i not in self.bad_samples]

    def report_bad(self, sample_id: int, reason: str) -> None:
        """Skip mode: record and log a bad sample. Otherwise: raise `DataError(reason)`."""
        if not self.skip_bad_samples:
            raise DataError(reason)
        if sample_id not in self.bad_samples:
            self.bad_samples[sample_id] = reason
            log.warning("skipping sample %d: %s", sample_id, reason)

    def verify(self, ids: Sequence[int] | None = None) -> dict[int, str]:
        """Check `ids` (default: every sample not found bad yet) as registering a dataset must:
        each caption is usable text and each image decodes in full (`image_problems`).

        Without `skip_bad_samples` the first bad sample raises `DataError` naming its file and
        the problem; with it every bad sample is recorded in `bad_samples` (so left out of the
        splits). Returns `bad_samples`.
        """
        ids = list(self.valid_ids() if ids is None else ids)
        for sid in ids:
            problem = caption_problem(self.raw_caption(sid))
            if problem:
                self.report_bad(sid, f"sample {sid} of {self}: {problem}")
        ids = [i for i in ids if i not in self.bad_samples]
        problems = self.image_problems(ids, stop_early=not self.skip_bad_samples)
        for sid in sorted(problems):
            self.report_bad(sid, problems[sid])
        return dict(self.bad_samples)

    def image_problems(self, ids: Sequence[int], stop_early: bool = False) -> dict[int, str]:
        """sample id -> why its image does not decode, for the bad ones among `ids`; with
        `stop_early` it may stop at the first found. This default decodes through `image()` in
        threads, uncached; sources of image files override it with a check cached by content."""

        def problem(sid: int) -> str:
            try:
                self.image(sid, resolution=CHECK_RESOLUTION)
            except DataError as err:
                return str(err)
            return ""

        with ThreadPoolExecutor() as pool:  # decoders release the GIL
            found = dict(zip(ids, pool.map(problem, ids)))
        return {sid: p for sid, p in found.items() if p}

    def image_digests(self, ids: Sequence[int]) -> np.ndarray:
        """The content digest of each sample's image (`S16`: first 16 bytes of a sha256), aligned
        with `ids`; equal digests mean equal images. This default hashes the decoded pixels;
        sources of image files hash the file bytes."""

        def digest(sid: int) -> bytes:
            pixels = self.image(sid).numpy().tobytes()  # (3, R, R) float32
            return hashlib.sha256(pixels).digest()[:DIGEST_BYTES]

        return np.array([digest(i) for i in ids], dtype=f"S{DIGEST_BYTES}")

    def columns(self) -> list[str]:
        """Per-sample metadata columns (user, artist, domain) that `column_values` gives."""
        return []

    def raw_column_values(self, column: str, ids: Sequence[int]) -> list[object]:
        """`column`'s value for each of `ids` (None where a sample has none); sources that
        keep metadata override this with `columns`."""
        raise NotImplementedError

    def column_values(self, column: str, ids: Sequence[int]) -> list[object]:
        """The value of metadata `column` for each of `ids` (e.g. for `--group-by`).

        `DataError` naming the column and those there are when the source has no such column,
        or naming the samples that have no value in it."""
        if column not in self.columns():
            known = ", ".join(self.columns()) or "none"
            raise DataError(f"{self}: no per-sample column {column!r} (columns: {known})")
        values = self.raw_column_values(column, ids)
        missing = [i for i, v in zip(ids, values) if v is None or v == ""]
        if missing:
            raise DataError(
                f"{self}: column {column!r} has no value for {len(missing)} samples, "
                f"e.g. ids {sorted(missing)[:5]}"
            )
        return values

    def captions_sha256(self) -> str:
        return captions_digest((sid, self.raw_caption(sid)) for sid in self.sample_ids())

    def dataset_fingerprint(self) -> DatasetFingerprint:
        """Ids and content hashes, computed on first use and kept."""
        if self._fingerprint is None:
            ids = tuple(self.sample_ids())
            self._fingerprint = DatasetFingerprint(
                ids, sha256_of_ids(ids), self.captions_sha256(), self.images_sha256()
            )
        return self._fingerprint

    def fingerprint(self) -> str:
        """sha256 over the sample ids, the captions and the image bytes."""
        return self.dataset_fingerprint().digest

    def describe(self) -> dict[str, Any]:
        """`{"name", "init_args"}`: enough for `build_source` to rebuild this source."""
        return {"name": self.registry_name, "init_args": dict(self._init_args)}

    def __len__(self) -> int:
        return len(self.sample_ids())

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._init_args.items())
        return f"{type(self).__name__}({args})"
