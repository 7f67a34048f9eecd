"""roc.png: the ROC curves of a report, one panel per kind of access, readable at a glance.

    png = render_roc_png(report)   # bytes; attack.render.write_report writes it as roc.png

Rules (ATTACKS.md): log-log axes from half a false positive up to 1; the chance diagonal and the
1% FPR line drawn in every panel; at most `MAX_CURVES` curves a panel, each in its own colour
(tab10), baselines dashed; the legend under its panel, outside the axes, with each curve's AUC,
attacks by AUC (highest first), then baselines.
Panels (`PANELS`), in order, each split into as few equal parts as keep it within
`MAX_CURVES` (`LiRA offline (1/2)`, `(2/2)`):
- black-box: Wu et al.'s learned attacks, with the threshold baseline where it reads black-box
  features and the blind diagnostic (no model access);
- gray-box, learned: the `<attack>-mlp` classifiers (and the threshold baseline where gray-box);
- gray-box, the papers' statistics: `loss-t100`, `secmi-stat`, `pia-t200`, `clid-th`;
- complexity-calibrated: the `<attack>-cc` rows;
- LiRA offline, LiRA online: the `lira-offline-*`, `lira-online-*` rows.
A panel with no curve is left out.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

from lightning_mia.attack.report import AttackReport, AttackResult
from lightning_mia.metrics import roc_curve

MAX_CURVES = 8  # curves a panel holds before it is split
COLUMNS = 2  # panels side by side
PANEL_SIZE = (5.0, 5.6)  # inches per panel, room for the legend under the axes
BUDGET = 0.01  # the FPR marked in every panel

Rule = Callable[[str, AttackResult], bool]  # (kind: "attack" | "baseline", result) -> in panel
PANELS: tuple[tuple[str, Rule], ...] = (
    ("black-box", lambda k, r: r.access in ("black-box", "none") and r.statistic != "calibrated"),
    (
        "gray-box, learned",
        lambda k, r: r.access == "gray-box" and r.statistic in ("learned", "baseline"),
    ),
    ("gray-box, the papers' statistics", lambda k, r: r.statistic == "reference"),
    (
        "complexity-calibrated",
        lambda k, r: r.statistic == "calibrated" and not r.name.startswith("lira-"),
    ),
    ("LiRA offline", lambda k, r: r.statistic == "calibrated" and r.name.startswith("lira-off")),
    ("LiRA online", lambda k, r: r.statistic == "calibrated" and r.name.startswith("lira-on")),
)


def _text(kind: str, r: AttackResult) -> str:
    """`pixel  AUC 0.912`, `threshold (baseline)`, `blind (diagnostic)`."""
    name = r.name + (
        " (diagnostic)" if r.is_diagnostic else " (baseline)" if kind == "baseline" else ""
    )
    auc = r.metrics.get("auc")
    return name + (f"  AUC {auc.value:.3f}" if auc is not None and auc.value is not None else "")


def _order(curve: tuple[str, AttackResult]) -> tuple[bool, float]:
    """Attacks by AUC, highest first (the legend then reads top to bottom as the curves
    usually lie), baselines after them."""
    kind, r = curve
    auc = r.metrics.get("auc")
    value = auc.value if auc is not None and auc.value is not None else 0.0
    return (kind == "baseline", -value)


def panels(report: AttackReport) -> list[tuple[str, list[tuple[str, AttackResult]]]]:
    """(title, [(kind, result), ...]) of every non-empty panel, each of at most MAX_CURVES."""
    scored = [(k, r) for k, r in report.results() if r.scores is not None and r.labels is not None]
    out = []
    for title, rule in PANELS:
        curves = sorted([(k, r) for k, r in scored if rule(k, r)], key=_order)
        parts = math.ceil(len(curves) / MAX_CURVES)
        size = math.ceil(len(curves) / parts) if parts else 0
        for i in range(parts):
            suffix = f" ({i + 1}/{parts})" if parts > 1 else ""
            out.append((title + suffix, curves[i * size : (i + 1) * size]))
    return out


def _draw(ax: Any, curves: list[tuple[str, AttackResult]], floor: float, colours: list) -> None:
    """One panel: the curves, chance, the 1% FPR line, log-log axes, the legend under it."""
    for i, (kind, r) in enumerate(curves):
        fpr, tpr, _ = roc_curve(r.scores, r.labels)
        style = "--" if kind == "baseline" else "-"
        colour = colours[i % len(colours)]
        ax.plot(
            fpr.clamp(min=floor),
            tpr.clamp(min=floor),
            style,
            color=colour,
            linewidth=1.5,
            label=_text(kind, r),
        )
    ax.plot([floor, 1], [floor, 1], ":", color="black", linewidth=1.0, label="chance")
    ax.axvline(BUDGET, color="0.75", linewidth=0.8, zorder=0)
    # along the line's foot, left of it: the curves of strong attacks run at the top, where
    # the label sat under them; below the chance line at this FPR only a worse-than-chance
    # curve passes
    ax.text(
        BUDGET,
        floor * 1.6,
        "1% FPR",
        color="0.45",
        fontsize=7,
        rotation=90,
        ha="right",
        va="bottom",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.grid(True, which="major", color="0.92", linewidth=0.6)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, fontsize=7.5, frameon=False)


def render_roc_png(report: AttackReport) -> bytes:
    """roc.png of `report` (module docstring) as PNG bytes."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = panels(report)
    negatives = [int((~r.labels).sum()) for _, curves in groups for _, r in curves]
    floor = 0.5 / max(max(negatives, default=1000), 1)
    cols = min(COLUMNS, max(len(groups), 1))
    rows = max(math.ceil(len(groups) / cols), 1)
    fig = Figure(figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), dpi=110)
    FigureCanvasAgg(fig)
    colours = list(colormaps["tab10"].colors)  # 10 distinct colours > MAX_CURVES
    for i, (title, curves) in enumerate(groups):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw(ax, curves, floor, colours)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"{report.family}: {report.setting} setting, {report.captions} captions")
    fig.subplots_adjust(hspace=0.75, wspace=0.28, top=0.93 if rows > 1 else 0.88)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()
