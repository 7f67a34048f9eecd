"""The inputs of a set-level audit: per-sample feature rows, and the checks they must pass.

    suspect = take_rows(target_table, suspect_ids, "suspect set")     # FeatureRows
    shadows = [take_rows(t, None, f"shadow {t.model_index}") for t in shadow_tables]
    names = membership_features(suspect, reference, *shadows)        # every non-blind feature

A `FeatureRows` has the shape of a query table (`lightning_mia.query.shards.QueryTable`):
`sample_id` (n,), `is_member` (n,) bool or None, `features` name -> (n,). Anything of that shape
(a `QueryTable` itself) can be passed to `take_rows`. Membership features are every feature the
queries produced except the `blind/*` ones (the query image and caption alone), which feed the
shift guard instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from lightning_mia.errors import UserError

BLIND_PREFIX = "blind/"
MAX_LISTED = 5  # ids named in a message


class SetLevelError(UserError):
    """Bad input to a set-level audit: the message names the set, the value and the problem."""


class TableLike(Protocol):
    """What a set-level audit reads of a query table."""

    sample_id: torch.Tensor  # int64 (S,)
    is_member: torch.Tensor  # bool (S,)
    features: dict[str, torch.Tensor]  # name -> (S,)


@dataclass(frozen=True)
class FeatureRows:
    """Some samples' features: one row per sample, in `sample_id` order as given."""

    name: str  # "suspect set", "reference set", "shadow 1": how messages name these rows
    sample_id: np.ndarray  # (n,) int64
    features: Mapping[str, np.ndarray]  # name -> (n,) float64
    is_member: np.ndarray | None = None  # (n,) bool, where membership is known

    def __len__(self) -> int:
        return len(self.sample_id)

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        """(n, F) float64 of the named features."""
        missing = [f for f in names if f not in self.features]
        if missing:
            raise SetLevelError(f"{self.name}: no features {missing[:MAX_LISTED]}")
        if not names:
            return np.zeros((len(self), 0))
        return np.stack([self.features[f] for f in names], axis=1)

    def select(self, ids: Sequence[int], name: str | None = None) -> FeatureRows:
        """The rows of these sample ids, in that order, named `name`; `SetLevelError` naming
        the ids it lacks, or when an id is listed twice."""
        name = name or self.name
        position = {int(s): j for j, s in enumerate(self.sample_id)}
        ids = [int(i) for i in ids]
        missing = [i for i in ids if i not in position]
        if missing:
            raise SetLevelError(
                f"{name}: {len(missing)} sample ids have no query rows, e.g. {_listed(missing)}"
            )
        if len(set(ids)) != len(ids):
            raise SetLevelError(f"{name}: sample ids listed twice")
        index = np.array([position[i] for i in ids], dtype=np.int64)
        member = None if self.is_member is None else self.is_member[index]
        features = {k: v[index] for k, v in self.features.items()}
        return FeatureRows(name, self.sample_id[index], features, member)


def _listed(ids: Sequence[int]) -> str:
    ids = sorted(int(i) for i in ids)
    more = f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else ""
    return f"{ids[:MAX_LISTED]}{more}"


def take_rows(table: TableLike, ids: Sequence[int] | None, name: str) -> FeatureRows:
    """The rows of `table` whose sample ids are `ids` (in that order), or all of them."""
    features = {k: v.detach().cpu().double().numpy().reshape(-1) for k, v in table.features.items()}
    rows = FeatureRows(
        name,
        table.sample_id.detach().cpu().numpy().astype(np.int64).reshape(-1),
        features,
        table.is_member.detach().cpu().numpy().astype(bool).reshape(-1),
    )
    return rows if ids is None else rows.select(ids)


def membership_features(*rows: FeatureRows, prefixes: Sequence[str] = ()) -> list[str]:
    """Every non-blind feature all `rows` have (those starting with one of `prefixes`, when
    given), sorted; `SetLevelError` when none is left."""
    common = set.intersection(*(set(r.features) for r in rows))
    names = sorted(n for n in common if not n.startswith(BLIND_PREFIX))
    if prefixes:
        names = [n for n in names if n.startswith(tuple(prefixes))]
    if not names:
        wanted = f" starting with {list(prefixes)}" if prefixes else ""
        raise SetLevelError(
            f"no membership features{wanted} common to {', '.join(r.name for r in rows)} "
            f"(features: {sorted(common)[:8]})"
        )
    return names


def blind_features(*rows: FeatureRows) -> list[str]:
    """The `blind/*` features all `rows` have, sorted (the shift guard's inputs)."""
    common = set.intersection(*(set(r.features) for r in rows))
    return sorted(n for n in common if n.startswith(BLIND_PREFIX))


def finite_columns(names: Sequence[str], *rows: FeatureRows) -> tuple[list[str], list[str]]:
    """(kept, dropped): features finite in every row of every `rows`, and the others."""
    kept, dropped = [], []
    for n in names:
        ok = all(np.isfinite(r.features[n]).all() for r in rows)
        (kept if ok else dropped).append(n)
    return kept, dropped


def check_disjoint(
    suspect: FeatureRows,
    reference: FeatureRows,
    image_digests: Mapping[int, bytes] | None = None,
) -> None:
    """`SetLevelError` when a sample is in both sets, by id or (with `image_digests`, id ->
    image content digest) by equal image content."""
    for rows in (suspect, reference):
        if len(np.unique(rows.sample_id)) != len(rows):
            raise SetLevelError(f"{rows.name}: sample ids listed twice")
    both = np.intersect1d(suspect.sample_id, reference.sample_id)
    if len(both):
        raise SetLevelError(
            f"suspect and reference sets overlap: {len(both)} sample ids in both, "
            f"e.g. {_listed(both.tolist())}"
        )
    if image_digests is None:
        return
    missing = [int(i) for r in (suspect, reference) for i in r.sample_id if i not in image_digests]
    if missing:
        raise SetLevelError(f"no image digest for {len(missing)} samples, e.g. {_listed(missing)}")
    seen = {image_digests[int(i)]: int(i) for i in suspect.sample_id}
    pairs = [
        (seen[image_digests[int(i)]], int(i))
        for i in reference.sample_id
        if image_digests[int(i)] in seen
    ]
    if pairs:
        shown = ", ".join(f"{s}={r}" for s, r in pairs[:MAX_LISTED])
        raise SetLevelError(
            f"suspect and reference sets overlap by image content: {len(pairs)} reference "
            f"images equal a suspect image (suspect id=reference id: {shown})"
        )


def check_same_source(
    suspect_source: Mapping[str, object], reference_source: Mapping[str, object]
) -> None:
    """`SetLevelError` when the two sets come from different data sources (`source.describe()`
    of each): a reference set must come from the suspect set's distribution."""
    if dict(suspect_source) != dict(reference_source):
        raise SetLevelError(
            f"the reference set comes from another source than the suspect set "
            f"({reference_source.get('name')} {reference_source.get('init_args')} vs "
            f"{suspect_source.get('name')} {suspect_source.get('init_args')}); bring a "
            "reference set from the suspect set's source"
        )


def group_labels(rows: FeatureRows, groups: Mapping[int, object], column: str) -> np.ndarray:
    """(n,) group names (str) of `rows` from `groups` (sample id -> value of `column`)."""
    missing = [int(i) for i in rows.sample_id if int(i) not in groups]
    if missing:
        raise SetLevelError(
            f"--group-by {column}: {len(missing)} samples of the {rows.name} have no value, "
            f"e.g. {_listed(missing)}"
        )
    return np.array([str(groups[int(i)]) for i in rows.sample_id], dtype=object)


def check_shadows(shadows: Sequence[FeatureRows]) -> None:
    """Shadow rows must carry membership and both classes."""
    for rows in shadows:
        if rows.is_member is None:
            raise SetLevelError(f"{rows.name}: no membership labels (is_member)")
        members = int(rows.is_member.sum())
        if members in (0, len(rows)):
            raise SetLevelError(
                f"{rows.name}: {members} members of {len(rows)} rows; shadow rows need both"
            )
