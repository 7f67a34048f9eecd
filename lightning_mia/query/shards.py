"""Query shards: safetensors files of per-sample features, keyed by `sample_id`.

One folder per queried model (`queries/<run-name>/`). Each shard holds

    sample_id    int64  (S,)
    is_member    uint8  (S,)
    model_index  int64  (S,)
    <group>/<name> float32 (S,)   one tensor per feature

and string metadata (`splits_hash`, `run_name`, `family`, `experiment`, ...). Shards are written
atomically (temporary file + rename), one or more per rank; `load_query_table` merges a folder,
de-duplicates by `sample_id` and sorts by it. `COMPLETE.json` marks a finished query;
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
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # measured per sample, per stage

    def __len__(self) -> int:
        return int(self.sample_id.numel())

    def feature_matrix(self, names: list[str]) -> torch.Tensor:
        """Stack the named features into (S, F); KeyError names what is missing."""
        missing = [n for n in names if n not in self.features]
        if missing:
            raise KeyError(
                f"features not in the shards of {self.metadata.get('run_name')}: {missing}"
            )
        return torch.stack([self.features[n] for n in names], dim=1)

    def costs(self) -> QueryCosts:
        """What querying this model cost per sample (N images, signal passes, seconds)."""
        n = self.metadata.get("num_images")
        return QueryCosts(
            num_images=int(n) if n else None,
            signal_queries=json.loads(self.metadata.get("signal_queries") or "{}"),
            seconds=dict(self.seconds),
        )


def write_shard(
    path: str | os.PathLike,
    sample_id: torch.Tensor,
    is_member: torch.Tensor,
    model_index: int | torch.Tensor,
    features: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
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
    meta = {str(k): str(v) for k, v in metadata.items()}
    path = Path(path)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def read_shard(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one shard; ShardError names the file if it is unreadable."""
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
    return tensors, meta


def shard_paths(folder: str | os.PathLike) -> list[Path]:
    """Shard files of a query folder, in a stable order."""
    return sorted(Path(folder).glob(SHARD_GLOB))


def _check_same(key: str, values: dict[str, str], folder: Path) -> str:
    distinct = set(values.values())
    if len(distinct) > 1:
        detail = ", ".join(f"{Path(p).name}: {v}" for p, v in sorted(values.items()))
        raise ShardError(f"query folder {folder}: shards disagree on {key} ({detail})")
    return distinct.pop() if distinct else ""


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
    for key in ("splits_hash", "run_name", "experiment"):
        _check_same(key, {str(p): m.get(key, "") for p, (_, m) in zip(paths, parts)}, folder)
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
    merged_meta = dict(parts[0][1])
    merged_meta.pop("shard", None)
    return QueryTable(
        sample_id=cat["sample_id"][idx],
        is_member=cat["is_member"][idx].bool(),
        model_index=int(model_index.item()),
        features={k: cat[k][idx] for k in names},
        metadata=merged_meta,
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


def mark_complete(folder: str | os.PathLike, num_samples: int, metadata: Mapping[str, str]) -> None:
    """Record that the query of this folder finished with `num_samples` samples."""
    atomic_write_json(Path(folder) / QUERY_COMPLETE, {"num_samples": num_samples, **metadata})


def read_complete(folder: str | os.PathLike) -> dict | None:
    """The COMPLETE.json record of a finished query folder, or None."""
    path = Path(folder) / QUERY_COMPLETE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
