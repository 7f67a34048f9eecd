"""Member and non-member lists of a model trained elsewhere, as one source (`member-lists`).

    members.jsonl     {"file_name": "imgs/0001.png", "text": "a red bicycle"}  (one a line)
    non_members.csv   file_name,text           (columns file_name|image|path, text|caption)
    members.txt       123                      (ids of the `base` source, one a line; or an
                                                `id` column in jsonl/csv, caption optional)
    members/          a Hugging Face dataset     (save_to_disk folder, or .parquet file(s)
                                                with image bytes and captions: `hf-datasets`)

    src = MemberListSource("members.jsonl", "non_members.csv", resolution=512)
    src = MemberListSource("members.txt", "non_members.txt", base=CocoSource(...).describe())
    src.members, src.non_members, src.rest     # sample ids: the target's row, everything else

Image paths are relative to the list's folder (or absolute). A row names an image file (and
needs a caption) or an id of the `base` source (whose caption it may replace). With a base
source, its samples keep their ids and listed files are numbered after its largest id; without
one, listed files are 0, 1, ... (members first). `rest` (the base's samples the lists do not
name) is where an external target's shadows and the attacker's own components draw from.

A Hugging Face dataset list takes its images from its `Image` column (or `image_column`) and
captions from `text`/`caption` (or `caption_column`); one without images lists base ids.
Columns other than image, caption and id (user, artist, ...) are per-sample metadata, of every
kind of list: `columns()`, `column_values()` (`--group-by`).
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
from lightning_mia.data.hf_datasets import HFDatasetSource, list_columns
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
HF_SUFFIX = ".parquet"  # or a folder: a Hugging Face dataset


def is_hf_list(path: Path) -> bool:
    """A member list kept as a Hugging Face dataset (a folder or parquet file)."""
    return path.is_dir() or path.suffix == HF_SUFFIX


def read_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) of a member list: jsonl, csv, or txt (one base-source id a line)."""
    if not path.is_file():
        raise DataError(f"member list {path}: no such file")
    if path.suffix not in LIST_SUFFIXES:
        raise DataError(
            f"member list {path}: expected one of {LIST_SUFFIXES}, a {HF_SUFFIX} file or a "
            f"Hugging Face dataset folder, got {path.suffix!r}"
        )
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
        image_column: str | None = None,
        caption_column: str | None = None,
    ) -> None:
        """
        Args:
            members: jsonl / csv / txt list of the target's training pairs, or a Hugging Face
                dataset (save_to_disk folder, .parquet file or folder of them).
            non_members: the same for pairs it was not trained on (same distribution).
            base: a source as splits.json records one (`{"name", "init_args"}`): the ids the
                lists may name, and the rest of the data (shadows, attacker's components).
            resolution: side of the square images.
            skip_bad_samples: skip and record bad samples instead of raising.
            image_column: a Hugging Face dataset list's image column (None: its Image column).
            caption_column: its caption column (None: `text` or `caption`).
        """
        super().__init__(resolution, skip_bad_samples)
        self._init_args = {
            "members": str(members),
            "non_members": str(non_members),
            "base": base,
            "resolution": resolution,
            "skip_bad_samples": skip_bad_samples,
        }
        if image_column is not None or caption_column is not None:  # recorded only when set
            self._init_args.update(image_column=image_column, caption_column=caption_column)
        self._columns = (image_column, caption_column)
        self.base: ImageCaptionSource | None = build_source(base) if base else None
        base_ids = self.base.sample_ids() if self.base is not None else []
        self._base_ids = set(base_ids)
        self._next_id = (max(base_ids) + 1) if base_ids else 0
        self._paths: dict[int, Path] = {}  # listed image files
        self._captions: dict[int, object] = {}  # captions of listed files / base overrides
        self._seen: dict[str, str] = {}  # image path or base id -> where it was listed
        self._hf: dict[int, tuple[HFDatasetSource, int]] = {}  # listed id -> (dataset, its id)
        self._rows: dict[int, dict] = {}  # listed id -> its list row (metadata columns)
        self.members = self._read_list(Path(members))
        self.non_members = self._read_list(Path(non_members))
        listed = set(self.members) | set(self.non_members)
        self.rest = sorted(self._base_ids - listed)
        self._ids = sorted(set(self._paths) | set(self._hf) | self._base_ids)

    def _read_list(self, path: Path) -> list[int]:
        if is_hf_list(path):
            return self._read_hf_list(path)
        rows = read_rows(path)
        if not rows:
            raise DataError(f"member list {path}: lists no samples")
        return [self._add_row(f"{path} line {n}", path.parent, row) for n, row in rows]

    def _read_hf_list(self, path: Path) -> list[int]:
        image, caption, data = list_columns(path, *self._columns, IMAGE_COLUMNS, CAPTION_COLUMNS)
        if data.num_rows == 0:
            raise DataError(f"member list {path}: lists no samples")
        if image is None:  # ids of the base source, as a txt list would give them
            rows = enumerate(data.to_list(), 1)
            return [self._add_row(f"{path} row {n}", path, row) for n, row in rows]
        if caption is None:
            cols = data.column_names
            raise DataError(f"member list {path}: no caption column (text or caption) in {cols}")
        src = HFDatasetSource(str(path), image, caption, None, None, self.resolution, False)
        out = []
        for hf_id in src.sample_ids():
            where = f"{path} row {hf_id}"
            self._once(f"hf {path.resolve()} row {hf_id}", where)
            sid, self._next_id = self._next_id, self._next_id + 1
            self._hf[sid], self._captions[sid] = (src, hf_id), src.raw_caption(hf_id)
            if problem := caption_problem(self._captions[sid]):
                self.report_bad(sid, f"{where}: {problem}")
            out.append(sid)
        return out

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
        self._paths[sid], self._captions[sid], self._rows[sid] = path, caption, row
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
        self._rows[sid] = row
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
        if sample_id in self._hf:
            src, hf_id = self._hf[sample_id]
            return src.image(hf_id, resolution or self.resolution)
        return self.base.image(sample_id, resolution or self.resolution)

    def _split(self, ids: Sequence[int]) -> tuple[list[int], dict[HFDatasetSource, list], list]:
        """(listed files, {dataset: its listed ids}, base ids) of `ids`."""
        files, based, hf = [], [], {}
        for i in ids:
            if i in self._paths:
                files.append(i)
            elif i in self._hf:
                hf.setdefault(self._hf[i][0], []).append(i)
            else:
                based.append(i)
        return files, hf, based

    def image_problems(self, ids: Sequence[int], stop_early: bool = False) -> dict[int, str]:
        files, hf, based = self._split(ids)
        found = file_image_problems(files, self.image_path, self.image_name, stop_early)
        for src, listed in hf.items():
            own = {self._hf[i][1]: i for i in listed}
            problems = src.image_problems(list(own), stop_early)
            found.update({own[k]: v for k, v in problems.items()})
        if based:
            found.update(self.base.image_problems(based, stop_early))
        return found

    def image_digests(self, ids: Sequence[int]) -> np.ndarray:
        files, hf, based = self._split(ids)
        parts = dict(zip(files, super().image_digests(files))) if files else {}
        for src, listed in hf.items():
            parts.update(zip(listed, src.image_digests([self._hf[i][1] for i in listed])))
        if based:
            parts.update(zip(based, self.base.image_digests(based)))
        return np.array([parts[i] for i in ids], dtype=f"S{DIGEST_BYTES}")

    def images_sha256(self) -> str:
        files = sorted(self._paths)
        h = hashlib.sha256()
        for i, d in zip(files, file_digests([self._paths[i] for i in files])):
            h.update(f"{i}\t{self._paths[i]}\t{d}\n".encode())
        listed = sorted(self._hf)
        for i, d in zip(listed, self.image_digests(listed)):
            h.update(f"{i}\thf\t{d.hex()}\n".encode())
        if self.base is not None:
            h.update(f"base\t{self.base.images_sha256()}\n".encode())
        return h.hexdigest()

    # ---- per-sample metadata ----
    def columns(self) -> list[str]:
        """Metadata columns of the lists (and of their datasets and the base source)."""
        skip = {*IMAGE_COLUMNS, *CAPTION_COLUMNS, *ID_COLUMNS}
        names = {k for row in self._rows.values() for k in row} - skip
        for src in {src for src, _ in self._hf.values()}:
            names |= set(src.columns()) - {src.caption_column}
        if self.base is not None:
            names |= set(self.base.columns())
        return sorted(names)

    def raw_column_values(self, column: str, ids: Sequence[int]) -> list[object]:
        return [self._column_value(column, i) for i in ids]

    def _column_value(self, column: str, sample_id: int) -> object:
        if column in self._rows.get(sample_id, {}):
            return self._rows[sample_id][column]
        if sample_id in self._hf:
            src, hf_id = self._hf[sample_id]
            return src.raw_column_values(column, [hf_id])[0] if column in src.columns() else None
        if sample_id in self._base_ids and column in self.base.columns():
            return self.base.raw_column_values(column, [sample_id])[0]
        return None
