"""`dataset_inference.png`: the p-value against the suspect set size, on a log scale.

    png = size_curve_png(result)        # PNG bytes; None when the result has no curve

The median p-value over random subsets of each size is drawn with its interquartile band, the
decision level alpha and p = 0.01 as horizontal lines, the smallest size reaching p < 0.01 as a
vertical line, and the full set's p-value as a marker; where the audit ran its second test (on
the LiRA-calibrated scores) that test's median curve too.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from lightning_mia.setlevel.result import TARGET_P, DatasetInferenceResult

FLOOR = 1e-12  # p-values below this are drawn at it (a log axis cannot show 0)
DPI = 150


def _draw_levels(ax: Any, alpha: float) -> None:
    ax.axhline(alpha, color="tab:red", ls="--", lw=1.3, label=f"alpha = {alpha:g} (decision level)")
    if not np.isclose(alpha, TARGET_P):
        ax.axhline(TARGET_P, color="tab:purple", ls=":", lw=1.3, label=f"p = {TARGET_P:g}")


def _size_ticks(low: int, high: int) -> list[int]:
    """1-2-5 ticks between the smallest and largest size, both ends included."""
    ticks = {low, high}
    for decade in (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000):
        ticks |= {m * decade for m in (1, 2, 5) if low < m * decade < high}
    return sorted(t for t in ticks if t == low or t == high or 1.25 * low < t < high / 1.25)


def size_curve_png(result: DatasetInferenceResult) -> bytes | None:
    """The figure as PNG bytes, or None without a curve."""
    curve = result.curve
    if curve is None:
        return None
    k = np.array(curve.sizes)
    med, low, high = (np.maximum(np.array(v), FLOOR) for v in (curve.median, curve.low, curve.high))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(9.5, 4.6), dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.fill_between(k, low, high, color="tab:blue", alpha=0.22, lw=0, label="interquartile range")
    ax.plot(k, med, "o-", color="tab:blue", lw=2, ms=4, label=f"median of {curve.repeats} subsets")
    _draw_levels(ax, result.alpha)
    if curve.resolution and np.isclose(low, curve.resolution, rtol=1e-6).any():
        label = f"floor of the curve's\npermutation tests ({curve.resolution:.0e})"
        ax.axhline(curve.resolution, color="0.45", ls=":", lw=1.3, label=label)
    if curve.smallest_size is not None:
        label = f"p < {TARGET_P:g} from {curve.smallest_size} samples"
        label += " (main test)" if result.calibrated is not None else ""
        ax.axvline(curve.smallest_size, color="tab:green", lw=1.5, label=label)
    second = result.calibrated
    lows = [float(low.min())]
    if second is not None and second.sizes:  # the second test, on the LiRA-calibrated scores
        med2 = np.maximum(np.array(second.medians), FLOOR)
        label = f"second test (LiRA-calibrated\nscores): median, best {second.best}"
        ax.plot(second.sizes, med2, "s--", color="tab:orange", lw=1.6, ms=4, label=label)
        lows.append(float(med2.min()))
    full = max(result.p_value, FLOOR)
    drawn = f", drawn at {FLOOR:g}" if result.p_value < FLOOR else ""
    label = f"full set (headline):\np = {result.p_value:.2g}{drawn}"
    ax.plot([result.suspect_size], [full], "D", color="black", ms=6, label=label)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(_size_ticks(int(k[0]), int(k[-1])))
    ax.set_yscale("log")
    ax.set_ylim(min(*lows, full, TARGET_P, result.alpha) / 5, 1.5)
    ax.set_xlabel(f"suspect set size k (random subsets of {result.suspect_size})", fontsize=11)
    ax.set_ylabel("p-value (one-sided)", fontsize=11)
    title = (
        f"Dataset inference: {result.decision}, p = {result.p_value:.2g} "
        f"(|S| = {result.suspect_size}, |R| = {result.reference_size}, {result.aggregation})"
    )
    ax.set_title(title, fontsize=12)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
