"""An attack report as people read it: the terminal table, report.md, roc.png; `write_report`.

roc = write_report(layout.report_dir("shadow"), report)  # report.json/.md, roc.png, scores.csv
print(format_table(report))

Rows: attacks, then `threshold (baseline)` and `blind (diagnostic)`. An attack whose AUC interval
lies wholly below 0.5 is marked `!` and named under the table ("ranks the target backwards").
Each TPR@FPR cell holds the value, its interval and the false positives it admits; the last
column, `at 1% cut: FPR / TPR`, what the threshold chosen without target labels for 1% FPR
(`AttackResult.realised`) gives on the target ("-" where there is none). roc.png: `attack.roc`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

from lightning_mia.attack.controls import CONTROL_CAPTIONS, control_header, control_rows
from lightning_mia.attack.examples import EXAMPLES_PNG, examples_png
from lightning_mia.attack.report import (
    BACKWARDS,
    REPORT_JSON,
    REPORT_MD,
    ROC_PNG,
    AttackReport,
    AttackResult,
)
from lightning_mia.attack.roc import render_roc_png
from lightning_mia.attack.scores import SCORES_CSV, render_scores_csv
from lightning_mia.metrics import FPR_BUDGETS, METRIC_NAMES
from lightning_mia.paths import atomic_write_bytes
from lightning_mia.setlevel import DatasetInferenceResult, markdown_section, terminal_lines
from lightning_mia.specs.signals import SignalOptions

METRIC_LABELS = {
    "accuracy": "accuracy",
    "auc": "AUC",
    "tpr@1%fpr": "TPR@1%FPR",
    "tpr@0.1%fpr": "TPR@0.1%FPR",
}
REALISED_LABEL = "at 1% cut: FPR / TPR"  # the realised column: see the module docstring
REALISED_NOTE = (
    f"`{REALISED_LABEL}`: the threshold an attacker would deploy for FPR < 1%, chosen without "
    "target labels (on the held-out training rows of a learned attack, the training rows of a "
    "one-score rule, LiRA's own OUT Gaussians), and the FPR and TPR it gives on the target."
)

__all__ = ["format_table", "render_markdown", "render_roc_png", "write_report"]

CONTROLS_NOTE = (
    "The attacks as trained on the shadows, scored on the target queried with one fixed caption "
    "for every sample and with captions swapped among the samples; kept = (AUC with the control "
    "- 0.5) / (AUC - 0.5): the share of an attack's lift over chance that survives without the "
    "true caption (blank where the AUC is within 0.05 of chance: the share would be noise)."
)


def label(kind: str, result: AttackResult) -> str:
    """The row name: `pixel`, `threshold (baseline)`, `blind (diagnostic)`; `!` if flagged."""
    name = result.name
    if result.is_diagnostic:
        name += " (diagnostic)"
    elif kind == "baseline":
        name += " (baseline)"
    return name + (" !" if BACKWARDS in result.flags else "")


def _header(report: AttackReport, metrics: Sequence[str] = METRIC_NAMES) -> list[str]:
    labels = dict(METRIC_LABELS)
    if report.accuracy_is_balanced:
        labels["accuracy"] = "balanced accuracy"
    return ["attack", "access", "queries", *(labels[m] for m in metrics), REALISED_LABEL]


def _rows(report: AttackReport, metrics: Sequence[str] = METRIC_NAMES) -> list[list[str]]:
    rows = []
    for kind, r in report.results():
        q = "-" if r.queries_per_sample is None else str(r.queries_per_sample)
        cells = [r.metrics[m].format() if m in r.metrics else "-" for m in metrics]
        realised = r.realised.format() if r.realised else "-"
        rows.append([label(kind, r), r.access, q, *cells, realised])
    return rows


def flag_lines(report: AttackReport) -> list[str]:
    """One line per flagged result, for under the table."""
    return [f"! {r.name}: {flag}" for _, r in report.results() for flag in r.flags]


def aligned(rows: list[list[str]]) -> list[str]:
    """A header row and its rows as aligned plain-text lines, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def unresolved(report: AttackReport) -> list[str]:
    """The TPR@FPR metrics that no row resolves: the target has fewer non-members than one
    false positive in the budget needs (`metrics.is_resolvable`)."""
    results = [r for _, r in report.results()]
    return [
        m
        for m in METRIC_NAMES
        if any(m in r.metrics for r in results)
        and all(not r.metrics[m].resolvable for r in results if m in r.metrics)
    ]


def format_table(report: AttackReport) -> str:
    """The attack x metric table as aligned plain text, for the terminal (a metric no row
    resolves is left out, in one line under it; report.md keeps its column of n/r); then the
    controls and the set-level audit when the run has them."""
    hidden = unresolved(report)
    shown = [m for m in METRIC_NAMES if m not in hidden]
    lines = aligned([_header(report, shown), *_rows(report, shown)])
    title = f"{report.setting} setting, {report.family}, {report.num_shadows} shadow model(s)"
    title += f", {caption_mode(report)}"
    non_members = report.test_samples.get("non_members")
    for m in hidden:
        lines.append(
            f"{METRIC_LABELS[m]}: not resolvable in any row (an FPR of {FPR_BUDGETS[m]:.1%} "
            f"needs {1 / FPR_BUDGETS[m]:,.0f} target non-members or more"
            + (f"; {non_members} here)" if non_members is not None else ")")
        )
    extra = []
    if report.controls:
        extra += ["controls: AUC with other captions, and the share of the lift kept"]
        extra += aligned([control_header(report), *control_rows(report)])
    if report.dataset_inference:
        extra += terminal_lines(DatasetInferenceResult.from_dict(report.dataset_inference))
    return "\n".join([title, *lines, *flag_lines(report), *extra])


def caption_mode(report: AttackReport) -> str:
    """`ground-truth captions`, `captioner captions (<folder>[, BLEU-4 ..., shapes ...])`, or
    what a control query read in their place."""
    if report.captions == "fixed-caption":
        fixed = (report.query or {}).get("fixed_caption")
        return CONTROL_CAPTIONS[report.captions] + (f" ({fixed!r})" if fixed else "")
    if report.captions in CONTROL_CAPTIONS:
        return CONTROL_CAPTIONS[report.captions]
    if report.captions != "captioner":
        return "ground-truth captions"
    c = report.captioner
    quality = c.get("quality") or {}
    facts = [Path(c.get("folder", "?")).name]
    if c.get("train_steps") is not None:
        facts.append(f"{c['train_steps']} steps")
    if "bleu" in quality:
        facts.append(f"held-out BLEU-4 {quality['bleu']:.2f}")
    if "shapes_colours" in quality:
        facts.append(f"shapes and colours right {quality['shapes_colours']:.2f}")
    return f"captioner captions ({', '.join(facts)})"


def format_comparison(reports: list[AttackReport], metrics: tuple = ("auc", "tpr@1%fpr")) -> str:
    """The attacks of several reports (e.g. ground-truth vs captioner captions) side by side:
    one row per attack, `metrics` of each report in turn (the paper's comparison)."""
    names = list(dict.fromkeys(n for r in reports for n in [*r.attacks, *r.baselines]))
    header = ["attack", *(f"{METRIC_LABELS[m]} ({r.captions})" for r in reports for m in metrics)]
    rows = [header]
    for name in names:
        cells = []
        for r in reports:
            result = r.attacks.get(name) or r.baselines.get(name)
            for m in metrics:
                ok = result is not None and m in result.metrics
                cells.append(result.metrics[m].format() if ok else "-")
        rows.append([name, *cells])
    lines = aligned(rows)
    title = f"{reports[0].setting} setting, {reports[0].family}: " + " vs ".join(
        caption_mode(r) for r in reports
    )
    return "\n".join([title, *lines])


def controls_markdown(report: AttackReport) -> list[str]:
    """The controls section: each row's AUC with one fixed caption and with swapped captions,
    and the share of its lift over chance each keeps (`attack.controls`)."""
    header = control_header(report)
    lines = ["## Controls", "", CONTROLS_NOTE, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in control_rows(report)]


def signal_settings(report: AttackReport) -> str:
    """The gray-box signals queried and their options as they differ from the defaults (or
    the preset that set them): how a reader matches the rows to the papers' settings."""
    query = report.query or {}
    signals = ", ".join(query.get("signals") or ()) or "the family's defaults"
    preset = query.get("signal_preset") or ""
    default = dataclasses.asdict(SignalOptions())
    changed = {k: v for k, v in (query.get("signal_options") or {}).items() if default.get(k) != v}
    options = ", ".join(f"{k}={v}" for k, v in sorted(changed.items())) or "defaults"
    return f"{signals}; options: {options}" + (f" (preset `{preset}`)" if preset else "")


def render_markdown(report: AttackReport, examples: bool = False) -> str:
    """report.md: the run's facts, the attack x metric table ("n/r" = not resolvable), notes."""
    t = report.target
    facts = [
        f"- setting: `{report.setting}`"
        + (f" (known fraction {report.known_fraction})" if report.known_fraction else ""),
        f"- family: `{report.family}`; target: `{t.get('run_name', '?')}`, "
        f"{t.get('train_steps_per_image') or 'unknown'} training steps per image, "
        f"augmentation {json.dumps(t.get('augmentation', {}), sort_keys=True)}",
        f"- images per query caption: {report.num_images}; shadow models: {report.num_shadows}",
        f"- query captions: {caption_mode(report)}"
        + (f", `{report.captioner['folder']}`" if report.captioner.get("folder") else ""),
        f"- gray-box signals: {signal_settings(report)}",
        f"- test samples: {report.test_samples}; seeds: {json.dumps(report.seeds, sort_keys=True)}",
        f"- splits hash: `{report.splits_hash}`; created {report.created}",
    ]
    header = _header(report)
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    table += ["", *(f"**{line}**" for line in flag_lines(report))] if flag_lines(report) else []
    table += ["", REALISED_NOTE]
    notes = [f"- {n}" for n in report.notes]
    scores = f"Per-sample scores: [{SCORES_CSV}]({SCORES_CSV})."
    if report.controls:
        table += ["", *controls_markdown(report)]
    if report.dataset_inference:
        audit = DatasetInferenceResult.from_dict(report.dataset_inference)
        table += ["", markdown_section(audit).rstrip()]
    parts = ["# Membership inference report", "", *facts, "", *table, "", "![ROC](roc.png)"]
    parts += ["", f"![examples]({EXAMPLES_PNG})"] if examples else []
    parts += ["", scores]
    if notes:
        parts += ["", "## Notes", "", *notes]
    return "\n".join(parts) + "\n"


def write_report(folder: str | os.PathLike, report: AttackReport) -> Path:
    """Write report.json, report.md, roc.png, scores.csv (and examples.png) into `folder`;
    returns roc.png's path.

    All four are rendered before anything is written, and each is written atomically, so a
    failure leaves no partial report (and an older complete one untouched).
    """
    folder = Path(folder)
    examples = examples_png(folder, report)  # None unless the target's query kept examples
    files = {
        REPORT_JSON: (json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n").encode(),
        REPORT_MD: render_markdown(report, examples is not None).encode(),
        ROC_PNG: render_roc_png(report),
        SCORES_CSV: render_scores_csv(report),
    }
    if examples is not None:
        files[EXAMPLES_PNG] = examples
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    return folder / ROC_PNG
