"""A finished attack run as it leaves the stage: on the terminal and in W&B.

show_outcome(outcome)                       # the table, the report files, the sync hint
log_results(logger, report_results(report, folder))      # lightning_mia.reporting
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_mia.attack.examples import EXAMPLES_PNG
from lightning_mia.attack.render import format_table
from lightning_mia.attack.report import REPORT_JSON, REPORT_MD, ROC_PNG, AttackReport
from lightning_mia.metrics import METRIC_NAMES, Metric
from lightning_mia.paths import ExperimentLayout
from lightning_mia.reporting import RunResults, offline_run_folders, wandb_mode_note
from lightning_mia.terminal import say


@dataclass(frozen=True)
class AttackOutcome:
    """A finished attack run: the report and where its files are."""

    report: AttackReport
    folder: Path  # report.json, report.md, roc.png
    layout: ExperimentLayout
    shown: bool = False  # its table is on the terminal already (run as its own process)


def show_outcome(outcome: AttackOutcome) -> None:
    """The result table, where the report files are, and the `wandb sync` hint if offline."""
    folder, root = outcome.folder, outcome.layout.root
    say(format_table(outcome.report))
    say(f"report: {folder / REPORT_JSON}, {folder / REPORT_MD}, {folder / ROC_PNG}")
    runs = offline_run_folders(root)
    if wandb_mode_note(root) and runs:  # offline: every stage of the experiment wrote a run
        # one at a time, oldest first: each artifact reaches W&B from the run that made it
        listed = " ".join(str(r) for r in runs)
        say(f"W&B ran offline; upload the experiment's runs with: wandb sync -n 1 {listed}")


def _scores_table(report: AttackReport) -> tuple[list[str], list[list[Any]]] | None:
    """Every attack's per-sample test score (where all score the same rows)."""
    scored = [r for _, r in report.results() if r.scores is not None]
    if not scored or any(r.scores.numel() != scored[0].scores.numel() for r in scored):
        return None
    ids, labels = scored[0].sample_id, scored[0].labels
    rows = [
        [int(ids[i]) if ids is not None else i, bool(labels[i])]
        + [float(r.scores[i]) for r in scored]
        for i in range(scored[0].scores.numel())
    ]
    return ["sample_id", "is_member", *(r.name for r in scored)], rows


def report_results(report: AttackReport, folder: Path) -> RunResults:
    """The report as W&B shows it: the result table (with intervals), the per-sample scores,
    the ROC curves and examples, one summary scalar per attack and metric."""
    columns = ["kind", "attack", "access", "queries"]
    columns += [f"{m}{s}" for m in METRIC_NAMES for s in ("", "/low", "/high")]
    columns += ["realised_fpr@1%cut", "realised_tpr@1%cut"]  # `AttackResult.realised`
    data, summary = [], {}
    for kind, r in report.results():
        row: list[Any] = [kind, r.name, r.access, r.queries_per_sample]
        for m in METRIC_NAMES:
            metric = r.metrics.get(m, Metric(None, resolvable=False))
            row += [metric.value, metric.low, metric.high]
            summary[f"{kind}/{r.name}/{m}"] = metric.value
        row += [r.realised.fpr, r.realised.tpr] if r.realised else [None, None]
        data.append(row)
    tables = {"attack/results": (columns, data)}
    scores = _scores_table(report)
    if scores is not None:
        tables["attack/scores"] = scores
    images = {"attack/roc": ([str(folder / ROC_PNG)], [f"{report.setting} setting"])}
    if (folder / EXAMPLES_PNG).is_file():
        images["attack/examples"] = ([str(folder / EXAMPLES_PNG)], [])
    return RunResults(tables, images, summary, folder, report.setting)
