"""A folder of images with `metadata.jsonl` or `metadata.csv`, as Hugging Face's imagefolder.

    my_data/
      metadata.jsonl     {"file_name": "0001.png", "text": "a red bicycle"}   (one per line)
      0001.png ...

    src = ImageFolderSource("my_data", caption_column="text", resolution=256)

The sample id is the row index, or the integer `sample_id` / `id` column when there is one.
Other columns (user, artist, ...) are per-sample metadata (`columns()`, `column_values()`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from lightning_mia.data.files import ImageFileSource
from lightning_mia.data.sources import (
    DataError,
    caption_problem,
    file_digests,
    register_source,
)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
ID_COLUMNS = ("sample_id", "id")


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line; `DataError` naming the line when malformed."""
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {n}: malformed JSON ({err})") from err
        if not isinstance(row, dict):
            raise DataError(f"{path} line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append((n, row))
    return rows


def read_csv(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each CSV record; `DataError` naming the line when malformed."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, strict=True)
            header = reader.fieldnames or []
            if len(set(header)) != len(header):
                raise DataError(f"{path}: duplicate column names in header {header}")
            for row in reader:
                n = reader.line_num
                if None in row:
                    raise DataError(f"{path} line {n}: more fields than the {len(header)} columns")
                if any(v is None for v in row.values()):
                    raise DataError(f"{path} line {n}: fewer fields than the {len(header)} columns")
                rows.append((n, row))
    except csv.Error as err:
        raise DataError(f"{path}: malformed CSV ({err})") from err
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from err
    return rows


def _row_id(row: dict, index: int, where: str) -> int:
    for col in ID_COLUMNS:
        if col in row:
            try:
                value = row[col]
                if isinstance(value, bool) or float(value) != int(value):
                    raise ValueError(value)
                return int(value)
            except (TypeError, ValueError) as err:
                raise DataError(f"{where}: {col} {row[col]!r} is not an integer") from err
    return index


@register_source("imagefolder")
class ImageFolderSource(ImageFileSource):
    """Images listed with their captions in `metadata.jsonl` or `metadata.csv`."""

    def __init__(
        self,
        root: str,
        caption_column: str = "text",
        resolution: int = 256,
        skip_bad_samples: bool = False,
    ) -> None:
        """
        Args:
            root: the folder holding metadata.jsonl or metadata.csv and the images.
            caption_column: the column with the caption text.
            resolution: side of the square images.
            skip_bad_samples: skip and record bad samples instead of raising.
        """
        super().__init__(resolution, skip_bad_samples)
        self._init_args = {
            "root": str(root),
            "caption_column": caption_column,
            "resolution": resolution,
            "skip_bad_samples": skip_bad_samples,
        }
        self.root, self.caption_column = Path(root), caption_column
        self.metadata = self._metadata_file()
        rows = (
            read_jsonl(self.metadata)
            if self.metadata.suffix == ".jsonl"
            else read_csv(self.metadata)
        )
        self._paths: dict[int, Path] = {}
        self._captions: dict[int, object] = {}
        self._rows: dict[int, dict] = {}  # each sample's metadata row (for `column_values`)
        for index, (line, row) in enumerate(rows):
            self._add_row(index, line, row)
        self._ids = sorted(self._paths)
        if not self._ids:
            raise DataError(f"{self.metadata}: lists no images")

    def _metadata_file(self) -> Path:
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root}: no such folder")
        found = [self.root / name for name in METADATA_FILES if (self.root / name).is_file()]
        if not found:
            raise DataError(f"image folder {self.root}: no {' or '.join(METADATA_FILES)}")
        if len(found) > 1:
            raise DataError(
                f"image folder {self.root}: both metadata.jsonl and metadata.csv; keep one"
            )
        return found[0]

    def _add_row(self, index: int, line: int, row: dict) -> None:
        where = f"{self.metadata} line {line}"
        for col in ("file_name", self.caption_column):
            if col not in row:
                raise DataError(f"{where}: no {col!r} column (columns: {sorted(row)})")
        sid = _row_id(row, index, where)
        if sid in self._paths:
            raise DataError(f"{where}: sample id {sid} appears twice")
        if not isinstance(row["file_name"], str) or not row["file_name"]:
            raise DataError(f"{where}: file_name {row['file_name']!r} is not a file name")
        path = self._paths[sid] = self.root / row["file_name"]
        self._captions[sid] = row[self.caption_column]
        self._rows[sid] = row
        if problem := caption_problem(row[self.caption_column]):
            self.report_bad(sid, f"{where} ({row['file_name']}): {problem}")
        elif not path.is_file():
            self.report_bad(sid, f"image {path} ({where}): no such file")
        elif path.stat().st_size == 0:
            self.report_bad(sid, f"image {path} ({where}): empty file (0 bytes)")

    def sample_ids(self) -> list[int]:
        return list(self._ids)

    def columns(self) -> list[str]:
        """The metadata columns besides file_name and the caption (user, artist, ...)."""
        names = {k for row in self._rows.values() for k in row}
        return sorted(names - {"file_name", self.caption_column})

    def raw_column_values(self, column: str, ids: Sequence[int]) -> list[object]:
        return [self._rows[i].get(column) for i in ids]

    def raw_caption(self, sample_id: int) -> object:
        return self._captions[sample_id]

    def image_path(self, sample_id: int) -> Path:
        return self._paths[sample_id]

    def images_sha256(self) -> str:
        digests = file_digests([self._paths[i] for i in self._ids])
        h = hashlib.sha256()
        for i, d in zip(self._ids, digests):
            h.update(f"{i}\t{self._paths[i].name}\t{d}\n".encode())
        return h.hexdigest()
