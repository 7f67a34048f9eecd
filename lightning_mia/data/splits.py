"""Membership splits: made once from a seed, saved as splits.json, hashed, checked by every stage.

The source ids are partitioned at random into a *target pool* and a disjoint *auxiliary pool*
(same distribution). Row 0 (the target model) takes members and non-members from the target pool;
rows 1..K (shadow models) each take an independent random part of the auxiliary pool as members
and the rest as non-members. With `shadow_pool="auxiliary+queries"` the shadows draw from the
auxiliary pool plus the target pool (LiRA "online": shadows see the target's query candidates).

With `public_size` there is a third pool, the *public pool*, disjoint from both: it trains what
the attacker owns or shares and that is not a shadow (the tiny autoencoder, the attacker's
encoder, a captioner), so those components have seen neither the target's nor the shadows'
candidates and treat both alike (`Splits.pool("public")`, the DataModule's `train_split`).

The draw, from `seed` alone:
1. the usable ids (sorted; bad samples left out with `skip_bad_samples`, duplicate images left
   out with `duplicates="drop"`) are shuffled once by `random.Random("lightning_mia.splits:
   {seed}:pools")`; the target pool is the first `target_size` of that order, the auxiliary pool
   the next `aux_size`, the public pool the next `public_size`. So target and auxiliary pools of
   given sizes are the same with or without a public pool; sizes left to default split what the
   public pool leaves in halves.
2. row k (0 = target) shuffles its pool with `random.Random("lightning_mia.splits:{seed}:row:{k}")`
   (a shadow with `shadow_size` first samples that many from its pool with the same generator)
   and takes the first `round(member_fraction * len)` as members.

Without `public_size` (the default) nothing of this differs from splits made before the public
pool existed: `public_size` and `duplicates` enter the recorded config, and `public_pool`,
`skipped_files` and `duplicates` enter splits.json, only when set or found, so the hash of
earlier splits is unchanged.

    splits = ensure_splits(ExperimentLayout("runs/demo"), ShapesSource(), num_shadows=2)
    splits.rows[0].members, splits.rows[1].nonmembers, splits.hash
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_mia.data.duplicates import (
    dropped_ids,
    duplicates_message,
    duplicates_record,
    find_duplicates,
)
from lightning_mia.data.sources import DataError, DatasetFingerprint, ImageCaptionSource
from lightning_mia.data.split_config import (  # noqa: F401  (ShadowPool, SHADOW_POOLS: re-exported)
    LATER_FIELDS,
    SHADOW_POOLS,
    ShadowPool,
    SplitConfig,
    config_problems,
    resolve_sizes,
)
from lightning_mia.paths import ExperimentLayout, atomic_write_json

SPLITS_FORMAT = "lightning_mia.splits/1"
POOLS = ("target", "auxiliary", "public")


@dataclass(frozen=True)
class SplitRow:
    """One model's membership: sorted member and non-member sample ids."""

    members: list[int]
    nonmembers: list[int]

    @property
    def queries(self) -> list[int]:
        """Members and non-members, sorted by sample id."""
        return sorted(self.members + self.nonmembers)

    def is_member(self) -> dict[int, bool]:
        """sample_id -> membership, for every query of this row."""
        return {**dict.fromkeys(self.nonmembers, False), **dict.fromkeys(self.members, True)}


@dataclass(frozen=True)
class Splits:
    """The membership matrix of an experiment (rows: 0 = target, 1..K = shadows)."""

    seed: int
    config: dict[str, Any]  # the arguments of make_splits, as asked
    rows: list[SplitRow]
    target_pool: list[int]
    aux_pool: list[int]
    dataset: dict[str, Any]  # DatasetFingerprint.to_dict() + "source": source.describe()
    skipped: dict[int, str] = field(default_factory=dict)  # bad samples left out: id -> reason
    hash: str = ""  # sha256 of the canonical JSON of everything (but itself)
    public_pool: list[int] | None = None  # None: no public pool (public_size not set)
    skipped_files: dict[str, str] = field(default_factory=dict)  # files left out whole: reason
    duplicates: dict[str, Any] | None = None  # duplicate images found (None: none found)

    @property
    def fingerprint(self) -> str:
        """The dataset fingerprint these splits were made from."""
        return self.dataset["fingerprint"]

    @property
    def num_models(self) -> int:
        return len(self.rows)

    @property
    def num_shadows(self) -> int:
        return len(self.rows) - 1

    def row(self, model_index: int) -> SplitRow:
        """The row of one model, with a clear error for an index the splits do not have."""
        if not 0 <= model_index < len(self.rows):
            raise DataError(
                f"model_index {model_index} not in splits (rows 0..{len(self.rows) - 1}: "
                f"target + {self.num_shadows} shadows)"
            )
        return self.rows[model_index]

    def pool(self, name: str) -> list[int]:
        """The ids of pool `name`: "target", "auxiliary" or "public" (sorted)."""
        if name not in POOLS:
            raise DataError(f"pool must be one of {POOLS}, got {name!r}")
        if name == "public" and self.public_pool is None:
            raise DataError(
                "these splits have no public pool: make them with public_size set (in a new "
                "experiment folder), or train on the auxiliary pool"
            )
        pools = {"target": self.target_pool, "auxiliary": self.aux_pool}
        return list(pools.get(name) or self.public_pool or [])

    def body(self) -> dict[str, Any]:
        """Everything but the hash, as JSON-ready data."""
        body = {
            "format": SPLITS_FORMAT,
            "seed": self.seed,
            "config": self.config,
            "dataset": self.dataset,
            "target_pool": self.target_pool,
            "aux_pool": self.aux_pool,
            "rows": [{"members": r.members, "nonmembers": r.nonmembers} for r in self.rows],
            "skipped": [{"sample_id": i, "reason": r} for i, r in sorted(self.skipped.items())],
        }
        if self.public_pool is not None:  # later keys: only when present (earlier hashes hold)
            body["public_pool"] = self.public_pool
        if self.skipped_files:
            body["skipped_files"] = [
                {"file": f, "reason": r} for f, r in sorted(self.skipped_files.items())
            ]
        if self.duplicates is not None:
            body["duplicates"] = self.duplicates
        return body

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "hash": body_hash(self.body())}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Splits:
        rows = [SplitRow(list(r["members"]), list(r["nonmembers"])) for r in d["rows"]]
        skipped = {int(s["sample_id"]): s["reason"] for s in d.get("skipped", [])}
        public = d.get("public_pool")
        return cls(
            d["seed"],
            d["config"],
            rows,
            list(d["target_pool"]),
            list(d["aux_pool"]),
            d["dataset"],
            skipped,
            d.get("hash", ""),
            public_pool=None if public is None else list(public),
            skipped_files={s["file"]: s["reason"] for s in d.get("skipped_files", [])},
            duplicates=d.get("duplicates"),
        )


def body_hash(body: dict[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _split(pool: list[int], member_fraction: float, rng: random.Random) -> SplitRow:
    order = list(pool)
    rng.shuffle(order)
    k = round(member_fraction * len(order))
    return SplitRow(sorted(order[:k]), sorted(order[k:]))


def _usable_ids(source: ImageCaptionSource, cfg: SplitConfig) -> tuple[list[int], list[list[int]]]:
    """Check every sample (bad ones: DataError, or left out with skip_bad_samples), find the
    duplicate images and, with `duplicates="drop"`, leave out all but one of each."""
    source.verify()
    if source.bad_samples or source.skipped_files:
        what = f"{len(source.bad_samples)} bad samples"
        if source.skipped_files:
            what += f" and {len(source.skipped_files)} unreadable files"
        rank_zero_warn(f"{what} of {source} skipped (recorded in splits.json)")
    ids = source.valid_ids()
    groups = find_duplicates(source, ids)
    if groups and cfg.duplicates == "drop":
        drop = set(dropped_ids(groups))
        ids = [i for i in ids if i not in drop]
    return ids, groups


def draw_rows(cfg: SplitConfig, target_pool: list[int], aux_pool: list[int]) -> list[SplitRow]:
    """Row 0 from the target pool, rows 1..K from the shadow pool, each from its own stream."""
    seed, fraction = cfg.seed, cfg.member_fraction
    rows = [_split(target_pool, fraction, random.Random(f"lightning_mia.splits:{seed}:row:0"))]
    candidates = aux_pool if cfg.shadow_pool == "auxiliary" else sorted(aux_pool + target_pool)
    for k in range(1, cfg.num_shadows + 1):
        rng = random.Random(f"lightning_mia.splits:{seed}:row:{k}")
        pool = candidates
        if cfg.shadow_size is not None:  # a shadow training set sized like the target's
            pool = sorted(rng.sample(candidates, cfg.shadow_size))
        rows.append(_split(pool, fraction, rng))
    return rows


def make_splits(source: ImageCaptionSource, *args: Any, **config: Any) -> Splits:
    """Check the data, then draw pools and rows from `seed` (see the module docstring);
    `args`/`config` are the fields of `SplitConfig`.

    Every caption and image is checked first (`source.verify()`): a bad sample raises
    `DataError`, or with `source.skip_bad_samples` is left out and recorded in `Splits.skipped`
    (files skipped whole in `Splits.skipped_files`). Duplicate images are reported (or dropped)
    before any pool is drawn. Sizes the data cannot hold raise `DataError`.
    """
    cfg = SplitConfig(*args, **config)
    ids, groups = _usable_ids(source, cfg)
    p = cfg.public_size or 0
    t, a = resolve_sizes(len(ids) - p, cfg.target_size, cfg.aux_size)
    problems = config_problems(cfg, t, a, len(ids))
    if problems:
        raise DataError(f"cannot make splits of {source}: " + "; ".join(problems))

    order = list(ids)
    random.Random(f"lightning_mia.splits:{cfg.seed}:pools").shuffle(order)
    target_pool, aux_pool = sorted(order[:t]), sorted(order[t : t + a])
    public_pool = sorted(order[t + a : t + a + p]) if cfg.public_size is not None else None
    rows = draw_rows(cfg, target_pool, aux_pool)
    duplicates = None
    if groups:
        pools = [target_pool, aux_pool] + ([public_pool] if public_pool is not None else [])
        memberships = [(r.members, r.nonmembers) for r in rows]
        duplicates = duplicates_record(source, groups, cfg.duplicates, memberships, pools)
        rank_zero_warn(duplicates_message(source, duplicates))
    dataset = {**source.dataset_fingerprint().to_dict(), "source": source.describe()}
    splits = Splits(
        cfg.seed,
        cfg.recorded(),
        rows,
        target_pool,
        aux_pool,
        dataset,
        dict(source.bad_samples),
        public_pool=public_pool,
        skipped_files=dict(source.skipped_files),
        duplicates=duplicates,
    )
    return replace(splits, hash=body_hash(splits.body()))


def save_splits(splits: Splits, path: str | os.PathLike, exclusive: bool = False) -> None:
    """Write splits.json atomically (a reader never sees half a file); `exclusive`: never
    over another one (FileExistsError)."""
    atomic_write_json(path, splits.to_dict(), exclusive)


def _expected(
    expected: str | DatasetFingerprint | ImageCaptionSource | None,
) -> DatasetFingerprint | str | None:
    if isinstance(expected, ImageCaptionSource):
        return expected.dataset_fingerprint()
    return expected


def load_splits(
    path: str | os.PathLike,
    expected_fingerprint: str | DatasetFingerprint | ImageCaptionSource | None = None,
) -> Splits:
    """Read splits.json, refusing one edited by hand or (when given) made from other data.

    `expected_fingerprint` may be a fingerprint string, a `DatasetFingerprint`, or the source
    itself; the last two let the error say what changed (ids added/removed, captions, images).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"splits file {path}: no such file (run the data preparation first)")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        fmt = d.get("format")
        splits = Splits.from_dict(d)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataError(f"splits file {path}: malformed ({err!r})") from err
    if fmt != SPLITS_FORMAT:
        raise DataError(f"splits file {path}: format {fmt!r}, expected {SPLITS_FORMAT!r}")
    actual = body_hash(splits.body())
    if actual != splits.hash:
        raise DataError(
            f"splits file {path}: its contents do not match its hash (edited by hand or "
            f"corrupted); stored {splits.hash[:12]}, contents {actual[:12]}. Restore it, or delete "
            "it to make new splits (models trained on the old ones become unusable)."
        )
    expected = _expected(expected_fingerprint)
    if expected is not None:
        digest = expected if isinstance(expected, str) else expected.digest
        if digest != splits.fingerprint:
            what = "its fingerprint differs"
            if isinstance(expected, DatasetFingerprint):
                what = DatasetFingerprint.from_dict(splits.dataset).describe_change(expected)
            raise DataError(
                f"splits file {path} was made from a different dataset: {what} "
                f"(stored fingerprint {splits.fingerprint[:12]}, now {digest[:12]}). Restore the "
                "data, or use a new experiment folder for the new data."
            )
    return splits


def check_config(splits: Splits, path: str | os.PathLike, **asked: Any) -> None:
    """Refuse splits made with other settings than `asked`, naming every differing key."""
    diffs = [
        f"{k}={splits.config.get(k, LATER_FIELDS.get(k))!r} (asked {v!r})"
        for k, v in asked.items()
        if splits.config.get(k, LATER_FIELDS.get(k)) != v
    ]
    if diffs:
        raise DataError(
            f"splits file {path} was made with {', '.join(diffs)}; ask for the stored values, "
            "or use another experiment folder"
        )


def ensure_splits(
    layout: ExperimentLayout | str | os.PathLike,
    source: ImageCaptionSource,
    *args: Any,
    **config: Any,
) -> Splits:
    """Make and save splits.json on first use; afterwards load it, check data and config
    (`args`/`config`: the fields of `SplitConfig`). Of stages started side by side, the first
    to write it decides; the others load and check it."""
    if not isinstance(layout, ExperimentLayout):
        layout = ExperimentLayout(layout)
    config = asdict(SplitConfig(*args, **config))
    if not layout.splits.exists():
        splits = make_splits(source, **config)
        try:  # stages started side by side both make it: the first one written is the one
            save_splits(splits, layout.splits, exclusive=True)
        except FileExistsError:
            pass
        else:
            _say_written(layout, splits)
            return splits
    splits = load_splits(layout.splits, source)
    check_config(splits, layout.splits, **config)
    if source.skip_bad_samples:
        source.bad_samples.update(splits.skipped)
    return splits


def _say_written(layout: ExperimentLayout, splits: Splits) -> None:
    public = f", public pool {len(splits.public_pool)}" if splits.public_pool is not None else ""
    rank_zero_info(
        f"splits: wrote {layout.splits} (target pool {len(splits.target_pool)}, auxiliary pool "
        f"{len(splits.aux_pool)}{public}, {splits.num_shadows} shadows, hash {splits.hash[:12]})"
    )
