"""One table across experiments, and the ablation figures: `python -m lightning_mia.summary`.

    python -m lightning_mia.summary runs/*                  # -> runs/summary.md, runs/summary.png
    python -m lightning_mia.summary runs/ablation-* --output results/

Reads each experiment's reports (`attack/report.json`, `attack/<setting>/report.json`) and the
factors the paper ablates: training steps per image of the target and images per query N (from
the report), the auxiliary pool size (splits.json) and the number of shadow models (the report).
Writes one markdown table (a row per experiment and setting; AUC / TPR@1%FPR of every attack)
and one figure: for each factor that varies among the shadow-setting rows, AUC and TPR@1%FPR
against it, one line per attack, over the experiments that hold every other factor at its most
common value (one factor at a time, as the paper's ablations). Folders without a report are
skipped and named.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_mia.attack.report import REPORT_JSON, AttackReport, read_report
from lightning_mia.errors import UserError
from lightning_mia.paths import ExperimentLayout
from lightning_mia.specs.query import caption_tag
from lightning_mia.terminal import argument_parser

FACTORS = {
    "steps_per_image": "training steps per image",
    "num_images": "images per query (N)",
    "aux_size": "auxiliary set size",
    "num_shadows": "shadow models",
}
METRICS = {"auc": "AUC", "tpr@1%fpr": "TPR@1%FPR"}
SUMMARY_MD, SUMMARY_PNG = "summary.md", "summary.png"


@dataclass
class SummaryRow:
    """One report: where it is from, its factors, and {attack: {metric: value or None}}."""

    experiment: str
    setting: str
    family: str
    factors: dict[str, float | int | None]
    metrics: dict[str, dict[str, float | None]] = field(default_factory=dict)


def _aux_size(layout: ExperimentLayout) -> int | None:
    if not layout.splits.is_file():
        return None
    doc = json.loads(layout.splits.read_text(encoding="utf-8"))
    size = doc.get("config", {}).get("aux_size")
    return int(size) if size is not None else len(doc.get("aux_pool", [])) or None


def _row(layout: ExperimentLayout, report: AttackReport) -> SummaryRow:
    steps = report.target.get("train_steps_per_image")
    factors = {
        "steps_per_image": round(float(steps), 1) if steps is not None else None,
        "num_images": report.num_images,
        "aux_size": _aux_size(layout),
        "num_shadows": report.num_shadows if report.setting == "shadow" else None,
    }
    # a captioner's report is another attacker (image only): its own row, not in the figures
    setting = report.setting + caption_tag(report.captions, report.captioner.get("folder", ""))
    row = SummaryRow(layout.name, setting, report.family, factors)
    for kind, result in report.results():
        name = result.name if kind == "attack" else f"{result.name} (baseline)"
        row.metrics[name] = {
            m: (result.metrics[m].value if m in result.metrics else None) for m in METRICS
        }
    return row


def read_rows(folders: Sequence[str | os.PathLike]) -> tuple[list[SummaryRow], list[str]]:
    """The rows of every report under `folders` (experiment folders), and the folders skipped."""
    rows, skipped = [], []
    for folder in sorted(Path(f) for f in folders):
        layout = ExperimentLayout(folder)
        reports = sorted(layout.attack.glob(f"**/{REPORT_JSON}")) if layout.attack.is_dir() else []
        if not reports:
            skipped.append(str(folder))
        for path in reports:
            rows.append(_row(layout, read_report(path.parent)))
    return rows, skipped


def _metric_cell(value: float | None) -> str:
    return "n/r" if value is None else f"{value:.3f}"


def _factor_cell(value: float | int | None) -> str:
    return "-" if value is None else f"{value:g}"


def attack_names(rows: Sequence[SummaryRow]) -> list[str]:
    """Every attack of the rows, in first-seen order (baselines last)."""
    names = list(dict.fromkeys(n for r in rows for n in r.metrics))
    return [n for n in names if "(baseline)" not in n] + [n for n in names if "(baseline)" in n]


def markdown_table(rows: Sequence[SummaryRow]) -> str:
    """A row per report; a column per attack holding `AUC / TPR@1%FPR` ("n/r": not resolvable)."""
    attacks = attack_names(rows)
    header = ["experiment", "setting", "family", *FACTORS, *attacks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r.experiment, r.setting, r.family, *(_factor_cell(r.factors[f]) for f in FACTORS)]
        for a in attacks:
            m = r.metrics.get(a)
            cells.append(" / ".join(_metric_cell(m[k]) for k in METRICS) if m else "-")
        lines.append("| " + " | ".join(cells) + " |")
    note = "Cells: AUC / TPR@1%FPR; n/r = not resolvable (too few non-members)."
    return "\n".join(["# Attacks across experiments", "", *lines, "", note]) + "\n"


def ablation_series(
    rows: Sequence[SummaryRow], factor: str
) -> dict[str, list[tuple[float, float | None, float | None]]]:
    """{attack: [(factor value, AUC, TPR@1%FPR), ...] sorted by value} over the shadow-setting
    rows whose other factors are at their most common values; empty if `factor` does not vary."""
    shadow = [r for r in rows if r.setting == "shadow" and r.factors[factor] is not None]
    if not shadow:
        return {}
    others = [f for f in FACTORS if f != factor]
    mode = {f: Counter(r.factors[f] for r in shadow).most_common(1)[0][0] for f in others}
    chosen = [r for r in shadow if all(r.factors[f] == mode[f] for f in others)]
    if len({r.factors[factor] for r in chosen}) < 2:
        return {}
    series: dict[str, list[tuple[float, float | None, float | None]]] = {}
    for r in sorted(chosen, key=lambda r: r.factors[factor]):
        for attack, m in r.metrics.items():
            if "(baseline)" not in attack:
                point = (float(r.factors[factor]), m["auc"], m["tpr@1%fpr"])
                series.setdefault(attack, []).append(point)
    return series


def render_figure(rows: Sequence[SummaryRow]) -> bytes | None:
    """PNG: AUC (top) and TPR@1%FPR (bottom) against each varying factor; None if none varies."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = {f: s for f in FACTORS if (s := ablation_series(rows, f))}
    if not panels:
        return None
    fig = Figure(figsize=(4.2 * len(panels), 6.4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(panels), squeeze=False)
    for col, (factor, series) in enumerate(panels.items()):
        for row, label in enumerate(METRICS.values()):
            ax = axes[row][col]
            for attack, points in series.items():
                xs = [p[0] for p in points if p[1 + row] is not None]
                ys = [p[1 + row] for p in points if p[1 + row] is not None]
                ax.plot(xs, ys, "o-", label=attack, linewidth=1.2, markersize=4)
            values = sorted({p[0] for pts in series.values() for p in pts})
            if min(values) > 0 and max(values) / min(values) >= 8:
                ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(values, labels=[f"{v:g}" for v in values])  # the measured points
            ax.set_ylim(0, 1.02)
            ax.set_xlabel(FACTORS[factor])
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"ablation: {FACTORS[factor]}", fontsize=9)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_summary(rows: Sequence[SummaryRow], output: str | os.PathLike) -> list[Path]:
    """summary.md (and summary.png when a factor varies) into `output`; the paths written."""
    from lightning_mia.paths import atomic_write_bytes

    output = Path(output)
    written = [output / SUMMARY_MD]
    atomic_write_bytes(written[0], markdown_table(rows).encode())
    png = render_figure(rows)
    if png is not None:
        written.append(output / SUMMARY_PNG)
        atomic_write_bytes(written[1], png)
    return written


def summary_parser() -> Any:
    """The parser of `python -m lightning_mia.summary`."""
    parser = argument_parser(prog="lightning_mia.summary", description=__doc__.split("\n")[0])
    parser.add_argument("experiments", nargs="+", help="experiment folders (e.g. runs/*)")
    parser.add_argument("--output", type=str, default="", help="folder (default: their parent)")
    return parser


def summary_main(args: list[str] | None = None) -> list[SummaryRow]:
    """`python -m lightning_mia.summary <experiment folders> [--output folder]`."""
    from lightning_mia.terminal import run_cli, say

    cfg = summary_parser().parse_args(args)

    def run() -> list[SummaryRow]:
        rows, skipped = read_rows(cfg.experiments)
        if not rows:
            raise UserError(f"no {REPORT_JSON} under the attack/ folders of {cfg.experiments}")
        parents = [str(Path(e).resolve().parent) for e in cfg.experiments]
        output = cfg.output or os.path.commonpath(parents)
        written = write_summary(rows, output or ".")
        say(markdown_table(rows))
        if skipped:
            say(f"skipped (no attack report): {', '.join(skipped)}")
        say(f"summary: {', '.join(str(p) for p in written)}")
        return rows

    return run_cli(run)


if __name__ == "__main__":
    summary_main()
