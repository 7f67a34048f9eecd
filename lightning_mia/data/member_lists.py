"""Member and non-member lists of a model trained elsewhere, as one source (`member-lists`).

    members.jsonl     {"file_name": "imgs/0001.png", "text": "a red bicycle"}  (one a line)
    non_members.csv   file_name,text           (columns file_name|image|path, text|caption)
    members.txt       123                      (ids of the `base` source, one a line; or an
                                                `id` column in jsonl/csv, caption optional)

    src = MemberListSource("members.jsonl", "non_members.csv", resolution=512)
    src = MemberListSource("members.txt", "non_members.txt", base=CocoSource(...).describe())
    src.members, src.non_members, src.rest     # sample ids: the target's row, everything else

Image paths are relative to the list's folder (or absolute). A row names an image file (and
needs a caption) or an id of the `base` source (whose caption it may replace). With a base
source, its samples keep their ids and listed files are numbered after its largest id; without
one, listed files are 0, 1, ... (members first). `rest` (the base's samples the lists do not
name) is where an external target's shadows and the attacker's own components draw from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_mia.data.checks import file_image_problems
from lightning_mia.data.files import ImageFileSource
from lightning_mia.data.imagefolder import read_csv, read_jsonl
from lightning_mia.data.sources import (
    DIGEST_BYTES,
    DataError,
    ImageCaptionSource,
    build_source,
    caption_problem,
    file_digests,
    register_source,
)

IMAGE_COLUMNS = ("file_name", "image", "path", "image_path")
CAPTION_COLUMNS = ("text", "caption")
ID_COLUMNS = ("sample_id", "id")
LIST_SUFFIXES = (".jsonl", ".csv", ".txt")


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a member list: jsonl, csv, or txt (one base-source id a line)."""
    if not path.is_file():
        raise DataError(f"member list {path}: no such file")
    if path.suffix not in LIST_SUFFIXES:
        raise DataError(f"member list {path}: expected one of {LIST_SUFFIXES}, got {path.suffix!r}")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".csv":
        return read_csv(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(n, {"id": line.strip()}) for n, line in enumerate(lines, 1) if line.strip()]


def _first(row: dict, columns: Sequence[str]) -> Any:
    return next((row[c] for c in columns if row.get(c) not in (None, "")), None)


@register_source("member-lists")
class MemberListSource(ImageFileSource):
    """The samples of two member lists (the target's row), plus an optional base source."""

    def __init__(
        self,
        members: str,
        non_members: str,
        base: dict[str, Any] | None = None,
        resolution: int = 512,
        skip_bad_samples: bool = False,
    ) -> None:
        """
        Args:
            members: jsonl / csv / txt list of the target's training pairs.
            non_members: the same for pairs it was not trained on (same distribution).
            base: a source as splits.json records one (`{"name", "init_args"}`): the ids the
                lists may name, and the rest of the data (shadows, attacker's components).
            resolution: side of the square images.
            skip_bad_samples: skip and record bad samples instead of raising.
        """
        super().__init__(resolution, skip_bad_samples)
        self._init_args = {
            "members": str(members),
            "non_members": str(non_members),
            "base": base,
            "resolution": resolution,
            "skip_bad_samples": skip_bad_samples,
        }
        self.base: ImageCaptionSource | None = build_source(base) if base else None
        base_ids = self.base.sample_ids() if self.base is not None else []
        self._base_ids = set(base_ids)
        self._next_id = (max(base_ids) + 1) if base_ids else 0
        self._paths: dict[int, Path] = {}  # listed image files
        self._captions: dict[int, object] = {}  # captions of listed files / base overrides
        self._seen: dict[str, str] = {}  # image path or base id -> where it was listed
        self.members = self._read_list(Path(members))
        self.non_members = self._read_list(Path(non_members))
        listed = set(self.members) | set(self.non_members)
        self.rest = sorted(self._base_ids - listed)
        self._ids = sorted(set(self._paths) | self._base_ids)

    def _read_list(self, path: Path) -> list[int]:
        rows = read_rows(path)
        if not rows:
            raise DataError(f"member list {path}: lists no samples")
        return [self._add_row(f"{path} line {n}", path.parent, row) for n, row in rows]

    def _once(self, key: str, where: str) -> None:
        if key in self._seen:
            raise DataError(f"{where}: {key} is listed twice (also at {self._seen[key]})")
        self._seen[key] = where

    def _add_row(self, where: str, folder: Path, row: dict) -> int:
        image, caption = _first(row, IMAGE_COLUMNS), _first(row, CAPTION_COLUMNS)
        if image is None:
            return self._add_base_row(where, row, caption)
        path = Path(str(image)) if Path(str(image)).is_absolute() else folder / str(image)
        self._once(f"image {path.resolve()}", where)
        sid, self._next_id = self._next_id, self._next_id + 1
        self._paths[sid], self._captions[sid] = path, caption
        if caption is None:
            self.report_bad(
                sid, f"{where} ({image}): no caption (a {' or '.join(CAPTION_COLUMNS)} column)"
            )
        elif problem := caption_problem(caption):
            self.report_bad(sid, f"{where} ({image}): {problem}")
        elif not path.is_file():
            self.report_bad(sid, f"image {path} ({where}): no such file")
        return sid

    def _add_base_row(self, where: str, row: dict, caption: object) -> int:
        raw = _first(row, ID_COLUMNS)
        if raw is None:
            raise DataError(
                f"{where}: no image column ({', '.join(IMAGE_COLUMNS)}) and no id "
                f"({', '.join(ID_COLUMNS)}); columns: {sorted(row)}"
            )
        if self.base is None:
            raise DataError(f"{where}: names id {raw} but no base source is given (--data)")
        try:
            sid = int(str(raw).strip())
        except ValueError as err:
            raise DataError(f"{where}: id {raw!r} is not an integer") from err
        if sid not in self._base_ids:
            raise DataError(f"{where}: id {sid} is not a sample of {self.base}")
        self._once(f"id {sid}", where)
        if caption is not None:
            self._captions[sid] = caption
        return sid

    # ---- the source interface ----
    def sample_ids(self) -> list[int]:
        return list(self._ids)

    def raw_caption(self, sample_id: int) -> object:
        if sample_id in self._captions or self.base is None:
            return self._captions[sample_id]
        return self.base.raw_caption(sample_id)

    def image_path(self, sample_id: int) -> Path:
        return self._paths[sample_id]

    def image(self, sample_id: int, resolution: int | None = None) -> torch.Tensor:
        if sample_id in self._paths:
            return super().image(sample_id, resolution)
        return self.base.image(sample_id, resolution or self.resolution)

    def _split(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        return [i for i in ids if i in self._paths], [i for i in ids if i not in self._paths]

    def image_problems(self, ids: Sequence[int], stop_early: bool = False) -> dict[int, str]:
        files, based = self._split(ids)
        found = file_image_problems(files, self.image_path, self.image_name, stop_early)
        if based:
            found.update(self.base.image_problems(based, stop_early))
        return found

    def image_digests(self, ids: Sequence[int]) -> np.ndarray:
        files, based = self._split(ids)
        parts = dict(zip(files, super().image_digests(files))) if files else {}
        if based:
            parts.update(zip(based, self.base.image_digests(based)))
        return np.array([parts[i] for i in ids], dtype=f"S{DIGEST_BYTES}")

    def images_sha256(self) -> str:
        files = sorted(self._paths)
        h = hashlib.sha256()
        for i, d in zip(files, file_digests([self._paths[i] for i in files])):
            h.update(f"{i}\t{self._paths[i]}\t{d}\n".encode())
        if self.base is not None:
            h.update(f"base\t{self.base.images_sha256()}\n".encode())
        return h.hexdigest()
