"""Hugging Face `datasets` collections, as their owners keep them (`hf-datasets`).

    src = HFDatasetSource("pokemon-blip", resolution=256)                 # a save_to_disk folder
    src = HFDatasetSource("laion-art/data", image_column="jpg", caption_column="caption",
                          split="train")                                  # parquet files
    src.column_values("artist", ids)                                      # for --group-by

`path` is a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (with several
splits, `split` picks one), a `.parquet` file, or a folder of them (searched recursively, as the
Hub lays them out: `data/train-00000-of-00002.parquet`; `split` keeps the files named
`<split>-*` or lying in a folder named `<split>`). Parquet files are converted to Arrow once, by
`datasets`, under `$LIGHTNING_MIA_CACHE/hf-datasets` and memory-mapped from then on; a
save_to_disk folder is memory-mapped as it is.

The image column holds an `Image` feature (`{"bytes", "path"}`), raw bytes, or a path (relative
to the dataset folder); images are decoded by the package's own decoder
(`lightning_mia.data.images`), never by `datasets`. The sample id is the row index, or the
integer `id_column`. Every other column except the image is per-sample metadata (`columns()`).
`datasets` is needed only for this source (`pip install 'lightning_mia[readers]'`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_mia.data.checks import cached_map
from lightning_mia.data.images import decode_image, image_problem
from lightning_mia.data.sources import (
    DIGEST_BYTES,
    DataError,
    ImageCaptionSource,
    cache_root,
    register_source,
)

DISK_MARKERS = ("state.json", "dataset_dict.json")  # what save_to_disk writes
DIGEST_BATCH = 1024  # rows of image bytes hashed (or checked) at a time


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            "the hf-datasets source needs the `datasets` package: "
            "pip install 'lightning_mia[readers]' (or pip install datasets)"
        ) from err
    return datasets


def parquet_files(path: Path, split: str | None) -> list[Path]:
    """The parquet files of `path` (a file or a folder, recursively), for `split` if given."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if split is not None and not path.is_file():
        files = [f for f in files if f.name.startswith(f"{split}-") or f.parent.name == split]
    if not files:
        which = f" of split {split!r}" if split else ""
        raise DataError(f"hf dataset {path}: no parquet files{which}")
    return files


def load_table(path: Path, split: str | None) -> Any:
    """A `datasets.Dataset` for `path` (save_to_disk folder, parquet file or folder)."""
    ds_lib = _datasets()
    if not path.exists():
        raise DataError(f"hf dataset {path}: no such file or folder")
    if path.is_dir() and any((path / m).is_file() for m in DISK_MARKERS):
        data = ds_lib.load_from_disk(str(path))
        if isinstance(data, ds_lib.DatasetDict):
            names = list(data)
            if split is None and len(names) != 1:
                raise DataError(f"hf dataset {path}: splits {names}; choose one with split")
            if split is not None and split not in data:
                raise DataError(f"hf dataset {path}: no split {split!r} (splits: {names})")
            data = data[split or names[0]]
        return data
    if path.is_file() and path.suffix != ".parquet":
        raise DataError(f"hf dataset {path}: expected a save_to_disk folder or .parquet files")
    files = [str(f) for f in parquet_files(path, split)]
    return ds_lib.Dataset.from_parquet(files, cache_dir=str(cache_root() / "hf-datasets"))


def _raw_image_column(data: Any, column: str, where: str) -> Any:
    """`data` reduced to `column`, with an Image feature left undecoded."""
    ds_lib = _datasets()
    feature = data.features[column]
    if isinstance(feature, ds_lib.Image):
        return data.select_columns([column]).cast_column(column, ds_lib.Image(decode=False))
    dtype = getattr(feature, "dtype", None)
    if dtype not in ("binary", "large_binary", "string", "large_string"):
        raise DataError(f"{where}: image column {column!r} holds {feature}, not images")
    return data.select_columns([column])


def _problem_of(by_digest: dict[str, bytes], key: str) -> str:
    return image_problem(by_digest[key]) or ""


@register_source("hf-datasets")
class HFDatasetSource(ImageCaptionSource):
    """A Hugging Face dataset (save_to_disk folder or parquet files) of images and captions."""

    def __init__(
        self,
        path: str,
        image_column: str = "image",
        caption_column: str = "text",
        id_column: str | None = None,
        split: str | None = None,
        resolution: int = 256,
        skip_bad_samples: bool = False,
    ) -> None:
        """
        Args:
            path: save_to_disk folder, .parquet file, or folder of .parquet files.
            image_column: the column holding the images (Image feature, bytes or paths).
            caption_column: the column holding the captions.
            id_column: an integer column of sample ids; None: the row index.
            split: the split of a DatasetDict folder, or of a parquet folder.
            resolution: side of the square images.
            skip_bad_samples: skip and record bad samples instead of raising.
        """
        super().__init__(resolution, skip_bad_samples)
        self._init_args = {
            "path": str(path),
            "image_column": image_column,
            "caption_column": caption_column,
            "id_column": id_column,
            "split": split,
            "resolution": resolution,
            "skip_bad_samples": skip_bad_samples,
        }
        self.path, self.image_column, self.caption_column = Path(path), image_column, caption_column
        self.data = load_table(self.path, split)
        names = list(self.data.column_names)
        for role, col in (("image", image_column), ("caption", caption_column), ("id", id_column)):
            if col is not None and col not in names:
                raise DataError(
                    f"hf dataset {self.path}: no {role} column {col!r} (columns: {names})"
                )
        self._images = _raw_image_column(self.data, image_column, f"hf dataset {self.path}")
        self._captions = self.data.data.column(caption_column).to_pylist()
        self._ids = self._read_ids(id_column)
        self._row = {sid: row for row, sid in enumerate(self._ids)}
        self._sorted = sorted(self._ids)
        self._digests: np.ndarray | None = None  # (rows,) S32 sha256 of each image's bytes
        if not self._ids:
            raise DataError(f"hf dataset {self.path}: no rows")

    def _read_ids(self, id_column: str | None) -> list[int]:
        if id_column is None:
            return list(range(self.data.num_rows))
        values = self.data.data.column(id_column).to_pylist()
        ids = []
        for row, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DataError(
                    f"hf dataset {self.path} row {row}: {id_column} {value!r} is not an integer"
                )
            ids.append(int(value))
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise DataError(f"hf dataset {self.path}: sample id {dup} appears twice in {id_column}")
        return ids

    # ---- the source interface ----
    def sample_ids(self) -> list[int]:
        return list(self._sorted)

    def raw_caption(self, sample_id: int) -> object:
        return self._captions[self._row[sample_id]]

    def image_name(self, sample_id: int) -> str:
        return f"{self.path} row {self._row[sample_id]} (id {sample_id})"

    def image_data(self, sample_id: int) -> bytes | Path:
        """The stored image of a sample: its bytes, or the file a path entry names."""
        value = self._images[self._row[sample_id]][self.image_column]
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            value = value.get("path")
        if isinstance(value, (bytes, bytearray)):
            return bytes(value)
        if isinstance(value, str) and value:
            path = Path(value)
            return path if path.is_absolute() else self.path / path
        raise DataError(f"image {self.image_name(sample_id)}: no image bytes or path")

    def image(self, sample_id: int, resolution: int | None = None) -> torch.Tensor:
        data = self.image_data(sample_id)
        return decode_image(data, resolution or self.resolution, self.image_name(sample_id))

    def _bytes_of(self, sample_id: int) -> bytes:
        data = self.image_data(sample_id)
        if isinstance(data, Path):
            try:
                return data.read_bytes()
            except OSError:
                return b""
        return data

    def _batches(self, ids: Sequence[int]) -> Iterator[list[tuple[int, bytes]]]:
        for start in range(0, len(ids), DIGEST_BATCH):
            yield [(i, self._bytes_of(i)) for i in ids[start : start + DIGEST_BATCH]]

    def _full_digests(self) -> np.ndarray:
        """(rows,) S32: the sha256 of each row's image bytes, computed once."""
        if self._digests is None:
            out = np.zeros(len(self._ids), dtype="S32")
            for batch in self._batches(self._ids):
                for sid, data in batch:
                    out[self._row[sid]] = hashlib.sha256(data).digest()
            self._digests = out
        return self._digests

    def image_digests(self, ids: Sequence[int]) -> np.ndarray:
        rows = [self._row[i] for i in ids]
        return self._full_digests()[rows].astype(f"S{DIGEST_BYTES}")

    def images_sha256(self) -> str:
        h = hashlib.sha256()
        digests = self._full_digests()
        for sid in self._sorted:
            h.update(f"{sid}\t{digests[self._row[sid]].hex()}\n".encode())
        return h.hexdigest()

    def image_problems(self, ids: Sequence[int], stop_early: bool = False) -> dict[int, str]:
        """Decode each image in full, once per content (cached by its sha256, in threads)."""
        problems: dict[int, str] = {}
        for batch in self._batches(list(ids)):
            by_digest = {hashlib.sha256(d).hexdigest(): d for _, d in batch}
            results = cached_map(
                list(by_digest),
                partial(_problem_of, by_digest),
                kind="image-bytes",
                stop_when=bool if stop_early else None,
            )
            for sid, data in batch:
                found = results.get(hashlib.sha256(data).hexdigest())
                if found:
                    problems[sid] = f"image {self.image_name(sid)}: {found}"
            if stop_early and problems:
                break
        return problems

    def columns(self) -> list[str]:
        """Every column but the image (captions and ids included), as metadata."""
        return [c for c in self.data.column_names if c != self.image_column]

    def raw_column_values(self, column: str, ids: Sequence[int]) -> list[object]:
        values = self.data.data.column(column).to_pylist()
        return [values[self._row[i]] for i in ids]


def list_columns(
    path: Path,
    image_column: str | None,
    caption_column: str | None,
    image_names: Sequence[str],
    caption_names: Sequence[str],
) -> tuple[str | None, str | None, Any]:
    """(image column, caption column, dataset) of a member list kept as a Hugging Face dataset:
    the columns given, else the first `Image` feature (or one of `image_names`) and the first of
    `caption_names` present; the image column is None for a list of ids only."""
    data = load_table(path, None)
    names = list(data.column_names)
    for col in (image_column, caption_column):
        if col is not None and col not in names:
            raise DataError(f"member list {path}: no column {col!r} (columns: {names})")
    if image_column is None:
        typed = [c for c in names if isinstance(data.features[c], _datasets().Image)]
        image_column = next(iter(typed + [c for c in image_names if c in names]), None)
    if caption_column is None:
        caption_column = next((c for c in caption_names if c in names), None)
    return image_column, caption_column, data
