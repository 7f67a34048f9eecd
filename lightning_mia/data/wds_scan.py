"""One pass over one WebDataset tar shard: where each sample's image lies, its caption, digests.

img2dataset writes `KEY.jpg|png|webp`, `KEY.txt` (the caption) and `KEY.json` (with "caption"
when there is no .txt). `scan_shard` groups members by key (a .txt caption wins over the .json
one), records each image member's offset and size, hashes its bytes, and checks the tar itself:
a member running past the end of the file, or anything but zero blocks where the member headers
stop, marks the shard broken with the byte offset where reading stopped. Problems of single
samples (no image, no caption, bad JSON...) are kept as text for the source to report.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from lightning_mia.data.sources import DIGEST_BYTES, caption_problem

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
MAX_ID = (1 << 63) - 1
END_OF_ARCHIVE = 1024  # two zero blocks close every complete tar
TAIL_CHUNK = 1 << 16
CAPTION_NONE, CAPTION_TXT, CAPTION_JSON = 0, 1, 2
ROW = np.dtype(  # one record per sample: a random read touches one page of it
    [
        ("shard", "<i4"),
        ("offset", "<i8"),  # image member data, in bytes from the start of the shard
        ("size", "<i8"),  # -1: no image member
        ("ext", "S4"),  # image member name = key + "." + ext
        ("caption_kind", "u1"),  # CAPTION_NONE | CAPTION_TXT | CAPTION_JSON (a JSON value)
        ("caption_start", "<i8"),  # into the caption bytes
        ("caption_end", "<i8"),
        ("key_start", "<i8"),  # into the key bytes
        ("key_end", "<i8"),
    ]
)


def key_to_id(key: str) -> int:
    """int(key) for numeric keys, else a stable non-negative 63-bit hash of the key."""
    if key.isdigit() and int(key) <= MAX_ID:
        return int(key)
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") >> 1


@dataclass
class _Entry:
    key: str
    ext: str = ""
    offset: int = 0
    size: int = -1  # -1: no image member yet
    images: int = 0  # image members seen under this key
    digest: bytes = b""
    caption: object = None
    kind: int = CAPTION_NONE
    problem: str = ""


@dataclass
class ShardScan:
    """What one shard holds, as flat arrays (n samples, in tar order), or why it is broken."""

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (n,)
    rows: np.ndarray = field(default_factory=lambda: np.zeros(0, ROW))  # (n,) ROW, shard 0
    digests: np.ndarray = field(default_factory=lambda: np.zeros(0, "S16"))  # (n,)
    captions: bytes = b""
    keys: bytes = b""
    images_sha256: str = ""  # the shard's image content (the fingerprint's part of it)
    problems: list[tuple[int, str]] = field(default_factory=list)  # (row, text after "path: ")
    broken: str = ""  # why the whole shard is unusable ("" when it is not)


def _read(raw: BinaryIO, member: tarfile.TarInfo) -> bytes:
    raw.seek(member.offset_data)
    return raw.read(member.size)


def _add_member(raw: BinaryIO, m: tarfile.TarInfo, e: _Entry, stream: Any) -> None:
    ext = posixpath.basename(m.name).split(".", 1)[1]
    kind = ext.lower()
    if kind in IMAGE_EXTENSIONS:
        data = _read(raw, m)
        e.ext, e.offset, e.size, e.images = ext, m.offset_data, m.size, e.images + 1
        e.digest = hashlib.sha256(data).digest()[:DIGEST_BYTES]
        stream.update(f"{e.key}\t{m.size}\n".encode() + data)
    elif kind == "txt":
        try:
            e.caption, e.kind = _read(raw, m).decode("utf-8"), CAPTION_TXT
        except UnicodeDecodeError:
            e.problem = f"{m.name} is not UTF-8 text"
    elif kind == "json" and e.kind != CAPTION_TXT:
        try:
            meta = json.loads(_read(raw, m).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            e.problem = f"{m.name}: malformed JSON ({err})"
            return
        if isinstance(meta, dict) and "caption" in meta:
            e.caption, e.kind = meta["caption"], CAPTION_JSON


def _end_problem(raw: BinaryIO, end: int, file_size: int) -> str:
    """Why the bytes from `end` (where member headers stopped) are not a tar's end, or ""."""
    raw.seek(end)
    pos = end
    while chunk := raw.read(TAIL_CHUNK):
        if chunk.strip(b"\0"):
            at = pos + len(chunk) - len(chunk.lstrip(b"\0"))
            return f"corrupt: no tar header at byte {at} (reading stopped at byte {end})"
        pos += len(chunk)
    if file_size - end < END_OF_ARCHIVE:
        return f"truncated: reading stopped at byte {end} of {file_size} (no end-of-archive blocks)"
    return ""


def _sample_problem(e: _Entry) -> str:
    where = f"sample {e.key}"
    if e.problem:
        return e.problem
    if e.size < 0:
        return f"{where}: no image member ({'/'.join(IMAGE_EXTENSIONS)})"
    if e.size == 0:
        return f"{where}: image {e.key}.{e.ext} is empty (0 bytes)"
    if e.kind == CAPTION_NONE:
        return f"{where}: no caption (.txt or 'caption' in .json)"
    problem = caption_problem(e.caption)
    return f"{where}: {problem}" if problem else ""


def _images_sha256(raw: BinaryIO, entries: list[_Entry]) -> str:
    """sha256 over every sample's image member, by offset (a key with several images: its last)."""
    h = hashlib.sha256()
    for e in sorted((e for e in entries if e.size >= 0), key=lambda e: e.offset):
        raw.seek(e.offset)
        h.update(f"{e.key}\t{e.size}\n".encode() + raw.read(e.size))
    return h.hexdigest()


def _pack(entries: list[_Entry], images_sha256: str) -> ShardScan:
    rows = np.zeros(len(entries), ROW)
    captions, keys = bytearray(), bytearray()
    for k, e in enumerate(entries):
        key = e.key.encode("utf-8")
        text = b""
        if e.kind == CAPTION_TXT:
            text = e.caption.encode("utf-8")
        elif e.kind == CAPTION_JSON:  # ASCII JSON: a lone surrogate survives the round trip
            text = json.dumps(e.caption, ensure_ascii=True).encode("ascii")
        rows[k] = (
            0,
            e.offset,
            e.size,
            e.ext.encode(),
            e.kind,
            len(captions),
            len(captions) + len(text),
            len(keys),
            len(keys) + len(key),
        )
        captions += text
        keys += key
    return ShardScan(
        ids=np.array([key_to_id(e.key) for e in entries], dtype=np.int64),
        rows=rows,
        digests=np.array([e.digest for e in entries], dtype=f"S{DIGEST_BYTES}"),
        captions=bytes(captions),
        keys=bytes(keys),
        images_sha256=images_sha256,
        problems=[(k, p) for k, e in enumerate(entries) if (p := _sample_problem(e))],
    )


def scan_shard(path: Path) -> ShardScan:
    """Index one shard in one pass; a shard that is not a complete tar comes back `broken`."""
    entries: dict[str, _Entry] = {}
    stream = hashlib.sha256()
    tf = None
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as raw, tarfile.open(path, "r:") as tf:
            for m in tf:
                if m.offset_data + m.size > file_size:
                    return ShardScan(
                        broken=f"truncated: reading stopped at byte {m.offset} of {file_size} "
                        f"({m.name} needs bytes {m.offset_data}..{m.offset_data + m.size})"
                    )
                base = posixpath.basename(m.name)
                if not m.isfile() or "." not in base or base.startswith("."):
                    continue
                key = posixpath.join(posixpath.dirname(m.name), base.split(".", 1)[0])
                _add_member(raw, m, entries.setdefault(key, _Entry(key)), stream)
            broken = _end_problem(raw, tf.offset, file_size)
            if broken:
                return ShardScan(broken=broken)
            multi = any(e.images > 1 for e in entries.values())
            digest = _images_sha256(raw, list(entries.values())) if multi else stream.hexdigest()
    except (tarfile.TarError, EOFError) as err:
        where = "not a readable (uncompressed) tar" if tf is None else f"byte {tf.offset}"
        return ShardScan(broken=f"{where}: {err}")
    except OSError as err:
        return ShardScan(broken=f"cannot be read ({err.strerror or err})")
    return _pack(list(entries.values()), digest)
