"""The set-level audit of an attack run: `attack.py --dataset-inference [--group-by COLUMN]`.

    result = run_audit(layout, target, shadows, options)   # after the queries; rank 0
    write_dataset_inference(folder, result)                 # dataset_inference.json / .png

The suspect set is the target's members and the reference set its non-members (for a model
trained elsewhere: the two lists given with `--external.members` / `--external.non_members`);
the statistic, its test, the shift guard and what they assume are `lightning_mia.setlevel`'s.
Everything the audit could refuse — its options, a group column the data source lacks — is
checked before any query (`check_audit`), so bad input writes nothing.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from lightning_mia.attack.report import AttackReport
from lightning_mia.data.sources import ImageCaptionSource, build_source
from lightning_mia.data.splits import load_splits
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.shards import QueryTable
from lightning_mia.reporting import RunResults
from lightning_mia.setlevel import (
    DATASET_INFERENCE_PNG,
    DatasetInferenceResult,
    SetLevelError,
    audit_tables,
    calibrated_scores_test,
    digest_map,
    group_map,
    wandb_items,
)


def experiment_source(layout: ExperimentLayout) -> ImageCaptionSource:
    """The data source the experiment's splits were drawn from."""
    return build_source(load_splits(layout.splits).dataset["source"])


def check_audit(layout: ExperimentLayout, options: Any) -> None:
    """One SetLevelError (or the source's DataError) for audit options that cannot run."""
    problems = options.audit.problems()
    if options.group_by and not options.dataset_inference:
        problems.append("--group-by needs --dataset-inference")
    if problems:
        raise SetLevelError("dataset inference: " + "; ".join(problems))
    if options.group_by:
        splits = load_splits(layout.splits)
        members = sorted(splits.row(0).members)
        group_map(experiment_source(layout), options.group_by, members)


def run_audit(
    layout: ExperimentLayout,
    target: QueryTable,
    shadows: list[QueryTable],
    options: Any,
    report: AttackReport | None = None,
    calibration: list[QueryTable] = (),
) -> DatasetInferenceResult:
    """Dataset inference of the target's members against its non-members (`setlevel`), each
    sample's difficulty calibrated by the shadows' `calibration` queries of it (where the
    options allow); with the shadow setting's `report`, also the second test on its
    LiRA-calibrated scores (their rules were fitted on the shadows alone:
    `setlevel.calibrated`)."""
    source = experiment_source(layout)
    ids = target.sample_id.tolist()
    members = [i for i, m in zip(ids, target.is_member.tolist()) if m]
    groups = group_map(source, options.group_by, members) if options.group_by else None
    result = audit_tables(
        target,
        shadows,
        groups=groups,
        group_by=options.group_by or None,
        image_digests=digest_map(source, ids),
        options=options.audit,
        calibration=calibration,
    )
    if report is None or report.setting != "shadow":  # partial: fitted on target rows
        return result
    scored = {
        r.name: (r.sample_id.tolist(), r.scores.tolist())
        for _, r in report.results()
        if r.scores is not None and r.sample_id is not None
    }
    non_members = sorted(set(ids) - set(members))
    return replace(result, calibrated=calibrated_scores_test(scored, members, non_members))


def audit_results(result: DatasetInferenceResult, folder: Any) -> RunResults:
    """The audit as W&B shows it (scalars, the size curve and groups tables, the figure)."""
    png = folder / DATASET_INFERENCE_PNG
    items = wandb_items(result, png if png.is_file() else None)
    images = {key: ([str(path)], []) for key, path in items.images.items()}
    return RunResults(items.tables, images, dict(items.scalars))
