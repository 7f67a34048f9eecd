"""splits.json of an external target: its row is given, the shadows' rows are drawn.

    splits = ensure_external_splits(layout, MemberListSource(...), num_shadows=2)
    splits = keep_external_splits(layout, external_splits(MemberListSource(...)))  # in 2 steps

Row 0 (the target) is the member and non-member lists: all of them when a base source gives
the rest of the data (`--data`), otherwise a seeded `query_fraction` of each list, the other
part of both lists becoming the rest. The rest (minus any copy of a row-0 image) is shuffled as
`make_splits` shuffles pools: the auxiliary pool first, then `public_size` samples for the
attacker's own components. Shadows are drawn from the auxiliary pool exactly as `make_splits`
draws them, each sized like the target (`shadow_size`) with the target's member share, so a
shadow is trained on as many pairs as the target was.
"""

from __future__ import annotations

import random
from dataclasses import replace

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_mia.data.duplicates import duplicates_message, duplicates_record, find_duplicates
from lightning_mia.data.member_lists import MemberListSource
from lightning_mia.data.sources import DataError
from lightning_mia.data.splits import (
    SplitConfig,
    SplitRow,
    Splits,
    body_hash,
    config_problems,
    draw_rows,  # the shadows' draw of make_splits, reused as is
    load_splits,
    save_splits,
)
from lightning_mia.paths import ExperimentLayout


def _take(ids: list[int], fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    order = sorted(ids)
    rng.shuffle(order)
    k = max(1, round(fraction * len(order)))
    return sorted(order[:k]), sorted(order[k:])


def _rows_and_rest(
    source: MemberListSource, seed: int, query_fraction: float
) -> tuple[SplitRow, list[int]]:
    """The target's row and the rest the shadows draw from (both without bad samples)."""
    bad = source.bad_samples
    members = [i for i in source.members if i not in bad]
    non = [i for i in source.non_members if i not in bad]
    if source.base is not None:
        return SplitRow(sorted(members), sorted(non)), [i for i in source.rest if i not in bad]
    if not 0.0 < query_fraction < 1.0:
        raise DataError(f"query_fraction must be in (0, 1) without --data, got {query_fraction}")
    rng = random.Random(f"lightning_mia.external:{seed}:lists")
    kept_m, rest_m = _take(members, query_fraction, rng)
    kept_n, rest_n = _take(non, query_fraction, rng)
    return SplitRow(kept_m, kept_n), sorted(rest_m + rest_n)


def external_splits(
    source: MemberListSource,
    num_shadows: int = 2,
    seed: int = 0,
    query_fraction: float = 0.5,
    public_size: int | None = None,
) -> Splits:
    """Check every listed sample, then build the splits (see the module docstring)."""
    source.verify()
    row, rest = _rows_and_rest(source, seed, query_fraction)
    target_pool = sorted(row.members + row.nonmembers)
    groups = find_duplicates(source, sorted(target_pool + rest))
    copies = {i for g in groups if set(g) & set(target_pool) for i in g}
    rest = [i for i in rest if i not in copies]  # a copy of a query image never trains a shadow
    order = list(rest)
    random.Random(f"lightning_mia.splits:{seed}:pools").shuffle(order)
    p = public_size or 0
    aux, public = sorted(order[: len(order) - p]), sorted(order[len(order) - p :])
    t = len(target_pool)
    cfg = SplitConfig(
        num_shadows=num_shadows,
        target_size=t,
        aux_size=len(aux),
        member_fraction=len(row.members) / max(1, t),
        seed=seed,
        shadow_size=min(t, len(aux)) if num_shadows else None,
        public_size=public_size,
    )
    problems = config_problems(cfg, t, len(aux), t + len(rest))
    if problems:
        raise DataError(f"cannot make splits of {source}: " + "; ".join(problems))
    rows = [row, *draw_rows(cfg, target_pool, aux)[1:]]
    duplicates = None
    if groups:
        memberships = [(r.members, r.nonmembers) for r in rows]
        pools = [target_pool, aux] + ([public] if public_size else [])
        duplicates = duplicates_record(source, groups, "report", memberships, pools)
        rank_zero_warn(duplicates_message(source, duplicates))
    dataset = {**source.dataset_fingerprint().to_dict(), "source": source.describe()}
    splits = Splits(
        seed,
        cfg.recorded(),
        rows,
        target_pool,
        aux,
        dataset,
        dict(source.bad_samples),
        public_pool=public if public_size else None,
        skipped_files=dict(source.skipped_files),
        duplicates=duplicates,
    )
    return replace(splits, hash=body_hash(splits.body()))


def ensure_external_splits(
    layout: ExperimentLayout, source: MemberListSource, **settings: object
) -> Splits:
    """Make and save splits.json; when it exists, it must be the same (lists, data, settings)."""
    return keep_external_splits(layout, external_splits(source, **settings))


def keep_external_splits(layout: ExperimentLayout, splits: Splits) -> Splits:
    """Save `splits` (of `external_splits`) as splits.json; when it exists, it must be the
    same (lists, data, settings)."""
    if layout.splits.is_file():
        stored = load_splits(layout.splits)
        if stored.hash != splits.hash:
            raise DataError(
                f"{layout.splits} was made from other member lists, data or settings (hash "
                f"{stored.hash[:12]}, now {splits.hash[:12]}): use another --experiment folder"
            )
        return stored
    save_splits(splits, layout.splits)
    rank_zero_info(
        f"splits: wrote {layout.splits} (target: {len(splits.rows[0].members)} members + "
        f"{len(splits.rows[0].nonmembers)} non-members; auxiliary pool {len(splits.aux_pool)}; "
        f"{splits.num_shadows} shadows; hash {splits.hash[:12]})"
    )
    return splits
