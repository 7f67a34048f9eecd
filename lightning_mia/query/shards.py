"""Query shards: safetensors files of per-sample features, keyed by `sample_id`.

One folder per queried model (`queries/<run-name>/`). Each shard holds

    sample_id    int64  (S,)
    is_member    uint8  (S,)
    model_index  int64  (S,)
    <group>/<name> float32 (S,)   one tensor per feature

and, as metadata, the query's `QueryRecord` (the queried model and the portable `QuerySpec`) as
one JSON document. Shards are written atomically (temporary file + rename), one or more per
rank; `load_query_table` merges a folder whose shards record one query, de-duplicates by
`sample_id` and sorts by it. `COMPLETE.json` marks a finished query (sample count and record);
`timing-r<rank>.json` files hold what each rank measured (seconds per query stage).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from lightning_mia.errors import UserError
from lightning_mia.paths import QUERY_COMPLETE, atomic_write_bytes, atomic_write_json
from lightning_mia.specs.attacks import QueryCosts
from lightning_mia.specs.query import QueryRecord, QuerySpecError

SHARD_GLOB = "shard-*.safetensors"
TIMING_GLOB = "timing-r*.json"  # per rank: measured seconds per query stage, samples queried
RESERVED = ("sample_id", "is_member", "model_index")


class ShardError(UserError):
    """A shard folder that is empty, corrupted, or mixes models/experiments."""


@dataclass
class QueryTable:
    """All samples of one queried model, sorted by `sample_id`."""

    sample_id: torch.Tensor  # int64 (S,)
    is_member: torch.Tensor  # bool (S,)
    model_index: int
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> float32 (S,)
    record: QueryRecord = field(default_factory=QueryRecord)  # the model and the query
    seconds: dict[str, float] = field(default_factory=dict)  # measured per sample, per stage

    def __len__(self) -> int:
        return int(self.sample_id.numel())

    def feature_matrix(self, names: list[str]) -> torch.Tensor:
        """Stack the named features into (S, F); KeyError names what is missing."""
        missing = [n for n in names if n not in self.features]
        if missing:
            raise KeyError(f"features not in the shards of {self.record.run_name}: {missing}")
        return torch.stack([self.features[n] for n in names], dim=1)

    def costs(self) -> QueryCosts:
        """What querying this model cost per sample (N images, signal passes, seconds)."""
        return QueryCosts(
            num_images=self.record.spec.num_images,
            signal_queries=dict(self.record.signal_queries),
            seconds=dict(self.seconds),
        )


def write_shard(
    path: str | os.PathLike,
    sample_id: torch.Tensor,
    is_member: torch.Tensor,
    model_index: int | torch.Tensor,
    features: Mapping[str, torch.Tensor],
    record: QueryRecord,
) -> Path:
    """Write one shard atomically; every feature must be (S,) like `sample_id`."""
    sample_id = sample_id.detach().to("cpu", torch.int64).reshape(-1)
    n = sample_id.numel()
    if isinstance(model_index, int):
        model_index = torch.full((n,), model_index, dtype=torch.int64)
    tensors = {
        "sample_id": sample_id.contiguous(),
        "is_member": is_member.detach().to("cpu", torch.uint8).reshape(-1).contiguous(),
        "model_index": model_index.detach().to("cpu", torch.int64).reshape(-1).contiguous(),
    }
    for name, value in features.items():
        if name in RESERVED:
            raise ValueError(f"feature name {name!r} is reserved")
        value = value.detach().to("cpu", torch.float32).reshape(-1).contiguous()
        if value.numel() != n:
            raise ValueError(f"feature {name!r} has {value.numel()} values for {n} samples")
        tensors[name] = value
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=record.to_metadata()))
    return path


def read_shard(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], QueryRecord]:
    """Tensors and query record of one shard; ShardError names the file if it is unreadable."""
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}) or {}
    except (OSError, SafetensorError, ValueError) as err:
        raise ShardError(f"shard {path}: unreadable ({err})") from err
    for key in RESERVED:
        if key not in tensors:
            raise ShardError(f"shard {path}: missing tensor {key!r}")
    try:
        return tensors, QueryRecord.from_metadata(meta, f"shard {path}")
    except (QuerySpecError, TypeError, ValueError) as err:
        detail = str(err) if isinstance(err, QuerySpecError) else f"unreadable record ({err})"
        raise ShardError(
            detail if detail.startswith("shard ") else f"shard {path}: {detail}"
        ) from None


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """Shard files of a query folder, in a stable order."""
    return sorted(Path(folder).glob(SHARD_GLOB))


def load_query_table(folder: str | os.PathLike) -> QueryTable:
    """Merge every shard of `folder` into one table, de-duplicated and sorted by sample_id.

    Duplicate sample ids (a re-run of a partly written batch) must carry identical values;
    shards of different models or experiments in one folder are refused.
    """
    folder = Path(folder)
    paths = shard_paths(folder)
    if not paths:
        raise ShardError(f"query folder {folder}: no shards ({SHARD_GLOB})")
    parts = [read_shard(p) for p in paths]
    records = [r for _, r in parts]
    for p, (_, record) in zip(paths, parts):
        if record != records[0]:
            diff = record_difference(records[0], record)
            raise ShardError(
                f"query folder {folder}: {paths[0].name} and {p.name} are shards of different "
                f"queries ({diff})"
            )
    names = sorted({k for t, _ in parts for k in t if k not in RESERVED})
    for p, (t, _) in zip(paths, parts):
        missing = [k for k in names if k not in t]
        if missing:
            raise ShardError(f"shard {p}: lacks features {missing} that other shards hold")
    cat = {k: torch.cat([t[k] for t, _ in parts]) for k in (*RESERVED, *names)}
    ids, order = torch.sort(cat["sample_id"], stable=True)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[1:] = ids[1:] != ids[:-1]
    idx = order[keep]
    model_index = cat["model_index"][idx].unique()
    if model_index.numel() != 1:
        raise ShardError(f"query folder {folder}: mixes model indices {model_index.tolist()}")
    return QueryTable(
        sample_id=cat["sample_id"][idx],
        is_member=cat["is_member"][idx].bool(),
        model_index=int(model_index.item()),
        features={k: cat[k][idx] for k in names},
        record=records[0],
        seconds=seconds_per_sample(folder),
    )


def seconds_per_sample(folder: str | os.PathLike) -> dict[str, float]:
    """Measured seconds per sample of each query stage (generate, features, each signal),
    summed over the ranks' timing files."""
    seconds: dict[str, float] = {}
    samples = 0
    for path in sorted(Path(folder).glob(TIMING_GLOB)):
        part = json.loads(path.read_text(encoding="utf-8"))
        samples += part["samples"]
        for name, value in part["seconds"].items():
            seconds[name] = seconds.get(name, 0.0) + value
    return {k: v / samples for k, v in seconds.items()} if samples else {}


def record_difference(a: QueryRecord, b: QueryRecord, keys: tuple[str, ...] = ()) -> str:
    """Where two records differ (`name: a vs b; spec.name: a vs b`), over `keys` and the
    spec (every field when `keys` is empty)."""
    da, db = a.to_dict(), b.to_dict()
    da.pop("spec"), db.pop("spec")
    keys = keys or tuple(da)
    diff = [f"{k}: {da[k]!r} vs {db[k]!r}" for k in keys if da[k] != db[k]]
    diff += [f"spec.{d}" for d in a.spec.differences(b.spec)]
    return "; ".join(diff) or "equal"


def mark_complete(folder: str | os.PathLike, num_samples: int, record: QueryRecord) -> None:
    """Record that the query of this folder finished with `num_samples` samples."""
    doc = {"num_samples": num_samples, "record": record.to_dict()}
    atomic_write_json(Path(folder) / QUERY_COMPLETE, doc)


def read_complete(folder: str | os.PathLike) -> QueryRecord | None:
    """The record of a finished query folder (its COMPLETE.json), or None."""
    path = Path(folder) / QUERY_COMPLETE
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    if "record" not in doc:  # an older format: treated as unfinished, refused by its shards
        return None
    return QueryRecord.from_dict(doc["record"])
