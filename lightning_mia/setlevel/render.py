"""A set-level audit as people read it: report.md's section, terminal lines, files, W&B items.

    paths = write_dataset_inference(layout.attack, result)  # dataset_inference.json and .png
    report_md += markdown_section(result)
    for line in terminal_lines(result): rank_zero_info(line)
    items = wandb_items(result)     # reporting.py logs items.scalars, items.tables, items.images

Nothing here imports wandb: `wandb_items` returns plain values for `lightning_mia.reporting`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_mia.paths import atomic_write_bytes, atomic_write_json
from lightning_mia.setlevel.figure import size_curve_png
from lightning_mia.setlevel.result import TARGET_P, DatasetInferenceResult, GroupRow

DATASET_INFERENCE_JSON = "dataset_inference.json"
DATASET_INFERENCE_PNG = "dataset_inference.png"
SECTION_TITLE = "## Set-level audit (dataset inference)"
CURVE_COLUMNS = ["suspect size", "reference size", "median p", "p 25%", "p 75%"]
GROUP_COLUMNS = ["group", "samples", "p", "q (BH)", "AUC", "shift p", "decision"]


def _p(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.1e}" if value < 1e-3 else f"{value:.3f}"


def _smallest(result: DatasetInferenceResult) -> str:
    curve = result.curve
    if curve is None:
        return "not computed"
    if curve.smallest_size is None:
        return f"not reached with up to {curve.sizes[-1]} suspect samples"
    return f"{curve.smallest_size} suspect samples (median of {curve.repeats} random subsets)"


def _fitted_on(result: DatasetInferenceResult) -> str:
    parts = []
    if result.shadow_rows:
        parts.append(f"{result.shadow_rows} shadow-model rows")
    if result.suspect_fit or result.reference_fit:
        parts.append(
            f"a held-out {result.suspect_fit} suspect + {result.reference_fit} reference samples"
        )
    return " and ".join(parts)


def _shift_line(result: DatasetInferenceResult) -> str:
    s = result.shift
    if s is None:
        return (
            "Shift guard: not run (no blind/* features in the query tables, or a set too small "
            "to split): nothing rules out a distribution shift between the sets."
        )
    o = s.outcome
    verdict = "DETECTS the suspect set" if s.detected else "does not tell the sets apart"
    return (
        f"Shift guard (query images and captions alone, no model): {verdict} at "
        f"{s.alpha:g}: p = {_p(o.p_value)}, AUC {o.auc:.3f}, d = {o.effect_size:.2f} "
        f"({o.suspect_n} + {o.reference_n} samples tested)."
    )


def _calibrated_line(result: DatasetInferenceResult) -> str:
    """The second test (`setlevel.calibrated`, which ran) in one line."""
    c = result.calibrated
    found = "detects" if c.detected(result.alpha) else "does not detect"
    return (
        f"Calibrated scores (second test, nothing fitted on these sets) {found} the suspect set "
        f"at {result.alpha:g}: p = {_p(c.p_value)} (Bonferroni over {len(c.rows)} LiRA rows; "
        f"best {c.best}: p = {_p(c.rows[c.best])}, AUC {c.auc:.3f}, {c.suspect_n} vs "
        f"{c.reference_n}, one-sided Mann-Whitney); smallest set for p < {TARGET_P:g}: "
        f"{c.smallest_size if c.smallest_size is not None else 'none'}"
    )


def _uncalibrated_line(result: DatasetInferenceResult) -> str:
    """The same test on raw features (where the main one is difficulty-calibrated)."""
    u = result.uncalibrated
    return (
        f"Without difficulty calibration (raw features, reported, not decided on): "
        f"p = {_p(u.p_value)} ({u.test}), d = {u.effect_size:.2f}, AUC {u.auc:.3f}."
    )


LEARNABLE_P = 0.05  # a left-out shadow's AUC not above 0.5 at this level: nothing learnable


def _transfer_line(result: DatasetInferenceResult) -> str:
    """What the aggregation learns of membership on shadows it never saw."""
    auc, p = result.shadow_transfer
    line = (
        f"Aggregation on left-out shadows (each scored by the fit on the others): members "
        f"against non-members AUC {auc:.3f}, p = {_p(p)}"
    )
    if not p < LEARNABLE_P:
        line += (
            f"; not significantly above chance (p >= {LEARNABLE_P:g}): no evidence that this "
            "score learns membership from the shadows, so a 'not detected' here says little "
            "about the suspect set"
        )
    return line + "."


def _group_cells(g: GroupRow) -> list[str]:
    o = g.outcome
    auc = "-" if o is None else f"{o.auc:.3f}"
    decision = g.decision + (f" ({g.note})" if g.note else "")
    p = None if o is None else o.p_value
    return [g.name, str(g.size), _p(p), _p(g.q_value), auc, _p(g.shift_p), decision]


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def curve_rows(result: DatasetInferenceResult) -> list[list[Any]]:
    """The curve as rows of CURVE_COLUMNS (numbers)."""
    c = result.curve
    if c is None:
        return []
    return [list(r) for r in zip(c.sizes, c.reference_sizes, c.median, c.low, c.high)]


def markdown_section(result: DatasetInferenceResult, png_name: str = DATASET_INFERENCE_PNG) -> str:
    """The report.md section: finding, numbers, assumptions, curve, groups."""
    o = result.outcome
    lines = [SECTION_TITLE, "", f"**{result.statement}**", ""]
    lines += _table(
        ["decision", "p-value", "test", "effect size (d)", "AUC", "suspect", "reference"],
        [
            [
                result.decision,
                _p(o.p_value),
                o.test,
                f"{o.effect_size:.3f}",
                f"{o.auc:.3f}",
                f"{o.suspect_n} tested of {result.suspect_size}",
                f"{o.reference_n} tested of {result.reference_size}",
            ]
        ],
    )
    lines += [
        "",
        f"- Smallest set size reaching p < {TARGET_P:g}: {_smallest(result)}.",
        f"- Aggregation: `{result.aggregation}`, a logistic score over {len(result.features)} "
        f"features, fitted on {_fitted_on(result)} (none of the tested samples).",
        f"- Tested: {result.difficulty}.",
        f"- Test: {o.reason}.",
        f"- {_shift_line(result)}",
    ]
    if result.uncalibrated is not None:
        lines.append(f"- {_uncalibrated_line(result)}")
    if result.shadow_transfer is not None:
        lines.append(f"- {_transfer_line(result)}")
    if result.calibrated is not None:
        lines.append(f"- {_calibrated_line(result)}.")
    if result.dropped_features:
        lines.append(f"- Left out (not finite everywhere): {', '.join(result.dropped_features)}.")
    lines += ["", "Assumptions:", *(f"- {a}" for a in result.assumptions), ""]
    if result.curve is not None:
        lines += [f"![dataset inference]({png_name})", ""]
        rows = [[str(k), str(kr), _p(m), _p(lo), _p(hi)] for k, kr, m, lo, hi in curve_rows(result)]
        lines += _table(CURVE_COLUMNS, rows) + [""]
    if result.groups:
        lines += [
            f"Per {result.group_by or 'group'} (Benjamini-Hochberg over "
            f"{sum(g.q_value is not None for g in result.groups)} tested groups; detected where "
            f"q < {result.alpha:g} and the group's own shift guard is quiet):",
            "",
        ]
        lines += _table(GROUP_COLUMNS, [_group_cells(g) for g in result.groups]) + [""]
    return "\n".join(lines)


def terminal_lines(result: DatasetInferenceResult) -> list[str]:
    """A few lines for the terminal: decision, numbers, smallest size, shift guard, groups."""
    o = result.outcome
    lines = [
        f"dataset inference: {result.decision.upper()} at alpha {result.alpha:g}: "
        f"p = {_p(o.p_value)} ({o.test}), d = {o.effect_size:.2f}, AUC {o.auc:.3f}, "
        f"{o.suspect_n} suspect vs {o.reference_n} reference tested ({result.aggregation}"
        f"{', difficulty-calibrated' if result.difficulty_models else ''})",
        f"  smallest set size for p < {TARGET_P:g}: {_smallest(result)}",
        f"  {_shift_line(result)}",
    ]
    if result.uncalibrated is not None:
        lines.append(f"  {_uncalibrated_line(result)}")
    if result.shadow_transfer is not None:
        lines.append(f"  {_transfer_line(result)}")
    if result.calibrated is not None:
        lines.append(f"  {_calibrated_line(result)}")
    if result.groups:
        hits = [g.name for g in result.groups if g.decision == "detected"]
        lines.append(
            f"  {len(hits)} of {len(result.groups)} {result.group_by or 'group'}s detected "
            f"(BH at {result.alpha:g}){': ' + ', '.join(hits[:10]) if hits else ''}"
        )
    return lines


@dataclass(frozen=True)
class WandbItems:
    """What to log to W&B: scalars, tables (columns, rows) and image files, by key."""

    scalars: dict[str, float | int | str]
    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    images: dict[str, Path] = field(default_factory=dict)


def wandb_items(result: DatasetInferenceResult, png: str | os.PathLike | None = None) -> WandbItems:
    """The audit as W&B keys under `dataset_inference/`; `png` the written figure, if any."""
    o, key = result.outcome, "dataset_inference"
    scalars: dict[str, float | int | str] = {
        f"{key}/decision": result.decision,
        f"{key}/p_value": o.p_value,
        f"{key}/effect_size": o.effect_size,
        f"{key}/auc": o.auc,
        f"{key}/suspect_tested": o.suspect_n,
        f"{key}/reference_tested": o.reference_n,
    }
    if result.curve is not None and result.curve.smallest_size is not None:
        scalars[f"{key}/smallest_size"] = result.curve.smallest_size
    if result.shift is not None:
        scalars[f"{key}/shift_p_value"] = result.shift.outcome.p_value
    if result.uncalibrated is not None:
        scalars[f"{key}/uncalibrated_p_value"] = result.uncalibrated.p_value
    if result.shadow_transfer is not None:
        scalars[f"{key}/shadow_transfer_auc"] = result.shadow_transfer[0]
        scalars[f"{key}/shadow_transfer_p_value"] = result.shadow_transfer[1]
    if result.calibrated is not None:
        scalars[f"{key}/calibrated_p_value"] = result.calibrated.p_value
        scalars[f"{key}/calibrated_best"] = result.calibrated.best
        if result.calibrated.smallest_size is not None:
            scalars[f"{key}/calibrated_smallest_size"] = result.calibrated.smallest_size
    tables = {}
    if result.curve is not None:
        tables[f"{key}/curve"] = (list(CURVE_COLUMNS), curve_rows(result))
    if result.groups:
        tables[f"{key}/groups"] = (list(GROUP_COLUMNS), [_group_cells(g) for g in result.groups])
    images = {f"{key}/curve_png": Path(png)} if png is not None else {}
    return WandbItems(scalars, tables, images)


def write_dataset_inference(
    folder: str | os.PathLike, result: DatasetInferenceResult
) -> list[Path]:
    """Write dataset_inference.json (and .png when there is a curve) into `folder`, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / DATASET_INFERENCE_JSON
    atomic_write_json(json_path, result.to_dict())
    written = [json_path]
    png = size_curve_png(result)
    if png is not None:
        atomic_write_bytes(folder / DATASET_INFERENCE_PNG, png)
        written.append(folder / DATASET_INFERENCE_PNG)
    return written
