"""The set-level audit driven from query tables: what the attack command calls.

    result = audit_tables(target, shadows)                     # S = members, R = non-members
    result = audit_tables(target, shadows, calibration=shadows_on_target)   # difficulty
    result = audit_tables(target, shadows, suspect_ids=s, reference_ids=r,
                          groups=group_map(source, "artist", s), group_by="artist",
                          image_digests=digest_map(source, [*s, *r]))

`target` and each shadow are query tables (`lightning_mia.query.shards.QueryTable` or anything
with `sample_id`, `is_member`, `features`). By default the suspect set is the target's members
and the reference set its non-members: for a model trained elsewhere these are the lists the
auditor brought (`--members S --non-members R`); for a target trained here, the audit of its
own training set. Shadow tables contribute all their rows with their known membership.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from lightning_mia.setlevel.audit import AuditOptions, dataset_inference
from lightning_mia.setlevel.result import DatasetInferenceResult
from lightning_mia.setlevel.rows import TableLike, take_rows


class SourceLike(Protocol):
    """What the audit reads of a data source (`lightning_mia.data.ImageCaptionSource`)."""

    def column_values(self, column: str, ids: Sequence[int]) -> list[object]: ...

    def image_digests(self, ids: Sequence[int]) -> object: ...


def group_map(source: SourceLike, column: str, ids: Sequence[int]) -> dict[int, object]:
    """sample id -> its value of metadata `column` (`--group-by`); the source's `DataError`
    names a missing column or the samples without a value."""
    ids = [int(i) for i in ids]
    return dict(zip(ids, source.column_values(column, ids)))


def digest_map(source: SourceLike, ids: Sequence[int]) -> dict[int, bytes]:
    """sample id -> image content digest, to refuse equal images in both sets."""
    ids = [int(i) for i in ids]
    digests = np.asarray(source.image_digests(ids))  # (n,) S16
    width = digests.dtype.itemsize  # read the raw bytes: items of an S array lose trailing NULs
    raw = np.ascontiguousarray(digests).view(np.uint8).reshape(len(ids), width)
    return {i: row.tobytes() for i, row in zip(ids, raw)}


def audit_tables(
    target: TableLike,
    shadows: Sequence[TableLike] = (),
    suspect_ids: Sequence[int] | None = None,
    reference_ids: Sequence[int] | None = None,
    groups: Mapping[int, object] | None = None,
    group_by: str | None = None,
    image_digests: Mapping[int, bytes] | None = None,
    options: AuditOptions = AuditOptions(),
    calibration: Sequence[TableLike] = (),
) -> DatasetInferenceResult:
    """Dataset inference on the target's query rows (see `audit.dataset_inference`).

    Args:
        target: the audited model's query table.
        shadows: shadow models' query tables (membership known).
        suspect_ids: the suspect set; None: the target's members.
        reference_ids: the reference set; None: the target's non-members.
        groups: sample id -> group of each suspect sample (`group_map`).
        group_by: the group column's name.
        image_digests: sample id -> image digest of both sets (`digest_map`).
        options: level, aggregation, test, curve.
        calibration: each shadow's query table of the target's samples (difficulty).
    """
    ids = target.sample_id.tolist()
    member = target.is_member.bool().tolist()
    if suspect_ids is None:
        suspect_ids = [i for i, m in zip(ids, member) if m]
    if reference_ids is None:
        reference_ids = [i for i, m in zip(ids, member) if not m]
    suspect = take_rows(target, suspect_ids, "suspect set")
    reference = take_rows(target, reference_ids, "reference set")
    shadow_rows = [take_rows(t, None, f"shadow table {k + 1}") for k, t in enumerate(shadows)]
    cal = [take_rows(t, None, f"shadow {k + 1}'s query") for k, t in enumerate(calibration)]
    return dataset_inference(
        suspect, reference, shadow_rows, groups, group_by, image_digests, options, cal
    )
