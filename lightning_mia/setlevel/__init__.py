"""Set-level audits (dataset inference): was this collection used to train the model?

    from lightning_mia.setlevel import AuditOptions, audit_tables, write_dataset_inference
    result = audit_tables(target_table, shadow_tables, options=AuditOptions(alpha=0.01))
    write_dataset_inference(layout.attack, result)      # dataset_inference.json / .png
    report_md += markdown_section(result); terminal_lines(result); wandb_items(result, png)

The method, its test and its assumptions: `lightning_mia.setlevel.audit`. This package sits
below `lightning_mia.attack` (it reads plain tensors shaped like query tables), so the attack
command can call it.
"""

from lightning_mia.setlevel.audit import AuditOptions, dataset_inference, shift_guard
from lightning_mia.setlevel.calibrated import CalibratedTest, calibrated_scores_test
from lightning_mia.setlevel.render import (
    DATASET_INFERENCE_JSON,
    DATASET_INFERENCE_PNG,
    WandbItems,
    markdown_section,
    terminal_lines,
    wandb_items,
    write_dataset_inference,
)
from lightning_mia.setlevel.result import (
    CONFOUNDED,
    DETECTED,
    NOT_DETECTED,
    DatasetInferenceResult,
    GroupRow,
    ShiftGuard,
    SizeCurve,
)
from lightning_mia.setlevel.rows import FeatureRows, SetLevelError, check_same_source, take_rows
from lightning_mia.setlevel.stats import Outcome, one_sided_test
from lightning_mia.setlevel.tables import audit_tables, digest_map, group_map

__all__ = [
    "CONFOUNDED",
    "DATASET_INFERENCE_JSON",
    "DATASET_INFERENCE_PNG",
    "DETECTED",
    "NOT_DETECTED",
    "AuditOptions",
    "CalibratedTest",
    "DatasetInferenceResult",
    "FeatureRows",
    "GroupRow",
    "Outcome",
    "SetLevelError",
    "ShiftGuard",
    "SizeCurve",
    "WandbItems",
    "audit_tables",
    "calibrated_scores_test",
    "check_same_source",
    "dataset_inference",
    "digest_map",
    "group_map",
    "markdown_section",
    "one_sided_test",
    "shift_guard",
    "take_rows",
    "terminal_lines",
    "wandb_items",
    "write_dataset_inference",
]
