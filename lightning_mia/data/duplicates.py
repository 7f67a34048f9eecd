"""Duplicate images, found when splits are made, before membership is drawn.

CC3M (and many scraped sets) repeat images, often with the same caption. A copy of a member
among the non-members leaks the member's label: the model reproduces the "non-member" as well as
the member. Samples whose image bytes are equal (`source.image_digests`: a sha256 of each file,
or of what defines a generated image) form a group; `make_splits` reports the groups (count and
examples, in the log and in splits.json) and, with `duplicates: drop`, keeps only the lowest id of
each group before any pool is drawn.

    groups = find_duplicates(source, ids)          # [[3, 17], [40, 41, 99]]  (sorted ids)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from lightning_mia.data.sources import ImageCaptionSource

DuplicatePolicy = Literal["report", "drop"]
DUPLICATE_POLICIES = ("report", "drop")
MAX_EXAMPLES = 5  # groups shown in the log and in splits.json
MAX_EXAMPLE_IDS = 5  # ids shown per group


def find_duplicates(source: ImageCaptionSource, ids: Sequence[int]) -> list[list[int]]:
    """Groups (two or more sorted ids, ordered by their first id) of `ids` with equal images."""
    if len(ids) < 2:
        return []
    ids_arr = np.asarray(ids, dtype=np.int64)  # (N,)
    digests = source.image_digests(ids)  # (N,) S16, aligned with ids
    _, inverse, counts = np.unique(digests, return_inverse=True, return_counts=True)
    dup = np.flatnonzero(counts[inverse] > 1)  # rows whose digest occurs again
    if not len(dup):
        return []
    order = dup[np.lexsort((ids_arr[dup], inverse[dup]))]  # by group, then by id
    cuts = np.flatnonzero(np.diff(inverse[order])) + 1
    groups = [g.tolist() for g in np.split(ids_arr[order], cuts)]
    return sorted(groups)


def dropped_ids(groups: list[list[int]]) -> list[int]:
    """Every id of a group but its lowest: what `duplicates: drop` leaves out."""
    return sorted(i for g in groups for i in g[1:])


def _same_caption(source: ImageCaptionSource, group: list[int]) -> bool:
    return len({repr(source.raw_caption(i)) for i in group}) == 1


def duplicates_record(
    source: ImageCaptionSource,
    groups: list[list[int]],
    policy: DuplicatePolicy,
    memberships: list[tuple[list[int], list[int]]],
    pools: list[list[int]],
) -> dict[str, Any]:
    """What splits.json records of the duplicate groups found.

    `memberships`: (members, non-members) of each row; `pools`: the drawn pools. Counts of groups
    that straddle a row's members and non-members (or two pools) show the leak left in place.
    """

    def straddling(a: list[int], b: list[int]) -> int:
        sa, sb = set(a), set(b)
        return sum(1 for g in groups if sa.intersection(g) and sb.intersection(g))

    pool_sets = [set(p) for p in pools]
    record = {
        "key": "image bytes (sha256)",
        "policy": policy,
        "groups": len(groups),
        "samples": sum(len(g) for g in groups),
        "same_caption_groups": sum(_same_caption(source, g) for g in groups),
        "examples": [
            {
                "sample_ids": g[:MAX_EXAMPLE_IDS],
                "size": len(g),
                "same_caption": _same_caption(source, g),
            }
            for g in groups[:MAX_EXAMPLES]
        ],
        "across_membership": [straddling(m, n) for m, n in memberships],
        "across_pools": sum(
            1 for g in groups if sum(bool(p.intersection(g)) for p in pool_sets) > 1
        ),
    }
    if policy == "drop":
        record["dropped"] = dropped_ids(groups)
    return record


def duplicates_message(source: ImageCaptionSource, record: dict[str, Any]) -> str:
    """One line for the log: how many, what they straddle, examples, and what to do."""
    examples = "; ".join(str(e["sample_ids"]) for e in record["examples"])
    head = (
        f"{record['groups']} groups of identical images ({record['samples']} samples, "
        f"{record['same_caption_groups']} groups with the same caption too) in {source}"
    )
    if record["policy"] == "drop":
        dropped = len(record["dropped"])
        return f"{head}: kept the lowest id of each, dropped {dropped} (e.g. {examples})"
    return (
        f"{head}; {record['across_membership'][0]} straddle the target's members and non-members "
        f"(e.g. {examples}). Set duplicates: drop to keep one of each (recorded in splits.json)"
    )
