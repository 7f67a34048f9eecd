"""Variance beyond the test set: R repeats of an experiment, each with its own splits, training
seed, queries and attacks, summarised as mean ± sd beside the bootstrap interval.

    summary = summarize_repeats(reports, folders=["runs/x", "runs/x/repeat-01", ...])
    write_repeats(layout.report_dir("shadow"), summary)  # repeats.json, repeats.md
    print(format_repeats(summary))

The bootstrap interval of one report covers the sampling of its test rows only; the spread
across repeats also covers which samples are members, the training randomness of target and
shadows, and the attack's own training. repeats.json::

    {"setting": "shadow", "repeats": 3, "folders": [...], "seeds": [0, 1, 2],
     "results": {"<name>": {"kind": "attack" | "baseline",
                            "metrics": {"auc": {"mean": 0.91, "sd": 0.02,
                                                "values": [...], "low": [...], "high": [...],
                                                "resolvable": true}, ...}}}}

`sd` is the sample standard deviation (n - 1; null for one repeat); a metric not resolvable in
some repeat has mean and sd null. Only results present in every repeat are summarised.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_mia.attack.render import METRIC_LABELS
from lightning_mia.attack.report import AttackReport
from lightning_mia.metrics import METRIC_NAMES
from lightning_mia.paths import atomic_write_bytes

REPEATS_JSON, REPEATS_MD = "repeats.json", "repeats.md"


def _metric(reports: Sequence[AttackReport], name: str, metric: str) -> dict[str, Any]:
    found = [dict(r.attacks, **r.baselines)[name].metrics.get(metric) for r in reports]
    values = [m.value if m is not None else None for m in found]
    resolvable = all(v is not None for v in values)
    mean = statistics.fmean(values) if resolvable else None
    sd = statistics.stdev(values) if resolvable and len(values) > 1 else None
    return {
        "mean": mean,
        "sd": sd,
        "values": values,
        "resolvable": resolvable,
        "low": [m.low if m is not None else None for m in found],
        "high": [m.high if m is not None else None for m in found],
    }


def summarize_repeats(
    reports: Sequence[AttackReport], folders: Sequence[str], seeds: Sequence[int]
) -> dict[str, Any]:
    """Mean ± sd of every metric of every result that all `reports` (one per repeat) hold."""
    if not reports:
        raise ValueError("no repeats to summarise")
    first = reports[0]
    names = [
        (kind, r.name)
        for kind, r in first.results()
        if all(r.name in {**x.attacks, **x.baselines} for x in reports)
    ]
    results = {
        name: {"kind": kind, "metrics": {m: _metric(reports, name, m) for m in METRIC_NAMES}}
        for kind, name in names
    }
    return {
        "setting": first.setting,
        "repeats": len(reports),
        "folders": [str(f) for f in folders],
        "seeds": list(seeds),
        "results": results,
    }


def repeat_cell(entry: dict[str, Any]) -> str:
    """`0.912 ± 0.013 [0.890, 0.931]`: mean ± sd across repeats [mean bootstrap interval]."""
    if not entry["resolvable"]:
        return "n/r"
    text = f"{entry['mean']:.3f}" + (f" ± {entry['sd']:.3f}" if entry["sd"] is not None else "")
    lows, highs = entry["low"], entry["high"]
    if all(v is not None for v in lows + highs):
        text += f" [{statistics.fmean(lows):.3f}, {statistics.fmean(highs):.3f}]"
    return text


def _rows(summary: dict[str, Any]) -> list[list[str]]:
    return [
        [
            name if r["kind"] == "attack" else f"{name} ({r['kind']})",
            *(repeat_cell(r["metrics"][m]) for m in METRIC_NAMES),
        ]
        for name, r in summary["results"].items()
    ]


def _title(summary: dict[str, Any]) -> str:
    return (
        f"{summary['setting']} setting, {summary['repeats']} repeats (seeds {summary['seeds']}): "
        "mean ± sd across repeats [mean bootstrap 95% interval]"
    )


def format_repeats(summary: dict[str, Any]) -> str:
    """The summary as an aligned plain-text table, for the terminal."""
    header = ["attack", *(METRIC_LABELS[m] for m in METRIC_NAMES)]
    rows = [header, *_rows(summary)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([_title(summary), *lines])


def render_repeats_md(summary: dict[str, Any]) -> str:
    """repeats.md: the summary table and the folder of every repeat."""
    header = ["attack", *(METRIC_LABELS[m] for m in METRIC_NAMES)]
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in _rows(summary)]
    folders = [
        f"- repeat {i} (seed {s}): `{f}`"
        for i, (f, s) in enumerate(zip(summary["folders"], summary["seeds"]))
    ]
    parts = [
        "# Membership inference across repeats",
        "",
        _title(summary),
        "",
        *table,
        "",
        "## Repeats",
        "",
        *folders,
    ]
    return "\n".join(parts) + "\n"


def write_repeats(folder: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Write repeats.json and repeats.md into `folder` (atomically); returns repeats.json."""
    folder = Path(folder)
    text = json.dumps(summary, indent=2, sort_keys=True) + "\n"
    markdown = render_repeats_md(summary)
    atomic_write_bytes(folder / REPEATS_JSON, text.encode())
    atomic_write_bytes(folder / REPEATS_MD, markdown.encode())
    return folder / REPEATS_JSON
