"""Membership splits: made once from a seed, saved as splits.json, hashed, checked by every stage.

The source ids are partitioned at random into a *target pool* and a disjoint *auxiliary pool*
(same distribution). Row 0 (the target model) takes members and non-members from the target pool;
rows 1..K (shadow models) each take an independent random part of the auxiliary pool as members
and the rest as non-members. With `shadow_pool="auxiliary+queries"` the shadows draw from the
auxiliary pool plus the target pool (LiRA "online": shadows see the target's query candidates).

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
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_mia.data.sources import DataError, DatasetFingerprint, ImageCaptionSource
from lightning_mia.paths import ExperimentLayout, atomic_write_json

SPLITS_FORMAT = "lightning_mia.splits/1"
ShadowPool = Literal["auxiliary", "auxiliary+queries"]
SHADOW_POOLS = ("auxiliary", "auxiliary+queries")


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
    hash: str = ""  # sha256 of the canonical JSON of everything above

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
            raise ValueError(
                f"model_index {model_index} not in splits (rows 0..{len(self.rows) - 1}: "
                f"target + {self.num_shadows} shadows)"
            )
        return self.rows[model_index]

    def body(self) -> dict[str, Any]:
        """Everything but the hash, as JSON-ready data."""
        return {
            "format": SPLITS_FORMAT,
            "seed": self.seed,
            "config": self.config,
            "dataset": self.dataset,
            "target_pool": self.target_pool,
            "aux_pool": self.aux_pool,
            "rows": [{"members": r.members, "nonmembers": r.nonmembers} for r in self.rows],
            "skipped": [{"sample_id": i, "reason": r} for i, r in sorted(self.skipped.items())],
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.body(), "hash": body_hash(self.body())}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Splits:
        rows = [SplitRow(list(r["members"]), list(r["nonmembers"])) for r in d["rows"]]
        skipped = {int(s["sample_id"]): s["reason"] for s in d.get("skipped", [])}
        return cls(
            d["seed"],
            d["config"],
            rows,
            list(d["target_pool"]),
            list(d["aux_pool"]),
            d["dataset"],
            skipped,
            d.get("hash", ""),
        )


@dataclass(frozen=True)
class SplitConfig:
    """What splits.json is drawn from, besides the data (see `make_splits`)."""

    num_shadows: int = 2
    target_size: int | None = None  # None: half the data (or what aux_size leaves)
    aux_size: int | None = None  # None: same as target_size (or the other half)
    member_fraction: float = 0.5
    seed: int = 0
    shadow_pool: ShadowPool = "auxiliary"
    shadow_size: int | None = None  # None: each shadow splits the whole shadow pool


def body_hash(body: dict[str, Any]) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _resolve_sizes(n: int, target_size: int | None, aux_size: int | None) -> tuple[int, int]:
    """Default: half/half of n; one size given: the other is the same (at most what is left)."""
    if target_size is None and aux_size is None:
        return n // 2, n - n // 2
    if aux_size is None:
        return target_size, max(0, min(target_size, n - target_size))
    if target_size is None:
        return max(0, min(aux_size, n - aux_size)), aux_size
    return target_size, aux_size


def _split(pool: list[int], member_fraction: float, rng: random.Random) -> SplitRow:
    order = list(pool)
    rng.shuffle(order)
    k = round(member_fraction * len(order))
    return SplitRow(sorted(order[:k]), sorted(order[k:]))


def _config_problems(
    num_shadows: int, member_fraction: float, shadow_pool: str, t: int, a: int, n: int
) -> list[str]:
    """Every problem with the asked split settings (all reported at once)."""
    problems = []
    if num_shadows < 0:
        problems.append(f"num_shadows must be >= 0, got {num_shadows}")
    if not 0.0 < member_fraction < 1.0:
        problems.append(f"member_fraction must be in (0, 1), got {member_fraction}")
    if shadow_pool not in SHADOW_POOLS:
        problems.append(f"shadow_pool must be one of {SHADOW_POOLS}, got {shadow_pool!r}")
    if t < 2:
        problems.append(f"target_size must be >= 2, got {t}")
    if num_shadows > 0 and a < 2:
        problems.append(f"aux_size must be >= 2 when there are shadows, got {a}")
    if t + a > n:
        problems.append(f"target_size {t} + aux_size {a} > the {n} usable samples")
    return problems


def make_splits(
    source: ImageCaptionSource,
    *args: Any,
    **config: Any,
) -> Splits:
    """Draw pools and rows from `seed`; `args`/`config` are the fields of `SplitConfig`. With
    `source.skip_bad_samples`, every image is decoded first and bad samples are left out and
    recorded in `Splits.skipped`."""
    cfg = SplitConfig(*args, **config)
    config = asdict(cfg)
    num_shadows, member_fraction, seed = cfg.num_shadows, cfg.member_fraction, cfg.seed
    shadow_pool, shadow_size = cfg.shadow_pool, cfg.shadow_size
    if source.skip_bad_samples:
        source.verify()
        if source.bad_samples:
            rank_zero_warn(
                f"{len(source.bad_samples)} bad samples of {source} skipped "
                "(recorded in splits.json)"
            )
    ids = source.valid_ids()
    t, a = _resolve_sizes(len(ids), cfg.target_size, cfg.aux_size)
    problems = _config_problems(num_shadows, member_fraction, shadow_pool, t, a, len(ids))
    if shadow_size is not None and not 2 <= shadow_size <= a:
        problems.append(f"shadow_size must be in [2, aux_size={a}], got {shadow_size}")
    if problems:
        raise ValueError(f"cannot make splits of {source}: " + "; ".join(problems))

    order = list(ids)
    random.Random(f"lightning_mia.splits:{seed}:pools").shuffle(order)
    target_pool, aux_pool = sorted(order[:t]), sorted(order[t : t + a])
    shadow_candidates = aux_pool if shadow_pool == "auxiliary" else sorted(aux_pool + target_pool)
    rows = [
        _split(target_pool, member_fraction, random.Random(f"lightning_mia.splits:{seed}:row:0"))
    ]
    for k in range(1, num_shadows + 1):
        rng = random.Random(f"lightning_mia.splits:{seed}:row:{k}")
        pool = shadow_candidates
        if shadow_size is not None:  # a shadow training set sized like the target's
            pool = sorted(rng.sample(shadow_candidates, shadow_size))
        rows.append(_split(pool, member_fraction, rng))
    dataset = {**source.dataset_fingerprint().to_dict(), "source": source.describe()}
    splits = Splits(seed, config, rows, target_pool, aux_pool, dataset, dict(source.bad_samples))
    return replace(splits, hash=body_hash(splits.body()))


def save_splits(splits: Splits, path: str | os.PathLike) -> None:
    """Write splits.json atomically (a reader never sees half a file)."""
    atomic_write_json(path, splits.to_dict())


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
        f"{k}={splits.config.get(k)!r} (asked {v!r})"
        for k, v in asked.items()
        if splits.config.get(k) != v
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
    (`args`/`config`: the fields of
    `SplitConfig`)."""
    if not isinstance(layout, ExperimentLayout):
        layout = ExperimentLayout(layout)
    config = asdict(SplitConfig(*args, **config))
    if layout.splits.exists():
        splits = load_splits(layout.splits, source)
        check_config(splits, layout.splits, **config)
        if source.skip_bad_samples:
            source.bad_samples.update(splits.skipped)
        return splits
    splits = make_splits(source, **config)
    save_splits(splits, layout.splits)
    rank_zero_info(
        f"splits: wrote {layout.splits} (target pool {len(splits.target_pool)}, auxiliary pool "
        f"{len(splits.aux_pool)}, {splits.num_shadows} shadows, hash {splits.hash[:12]})"
    )
    return splits
