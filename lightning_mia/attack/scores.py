"""Per-sample scores on disk: `attack/scores.csv` beside report.json.

    write_report(folder, report)        # writes scores.csv with report.json (attack.render)
    table = read_scores(folder)         # ScoreTable: sample_id, is_member, model_index, columns

One row per test sample (sorted by `sample_id`), the columns

    sample_id, is_member (0/1), model_index (the scored model's row of splits.json: the target),
    <attack>..., <baseline>...

each attack and baseline column holding the scores its metrics were read from (higher = member;
the blind diagnostic's are its out-of-fold scores). A cell is empty where a result did not score
that sample (the partial setting tests the attacks on part of the target's rows, while the blind
diagnostic scores all of them). Floats are written with `repr`, which reads back exactly, so
every AUC and TPR@FPR of report.json can be recomputed from this file alone. CSV needs nothing
beyond the standard library (pyarrow is not a dependency of the package).
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_mia.attack.report import AttackReport

SCORES_CSV = "scores.csv"
KEY_COLUMNS = ("sample_id", "is_member", "model_index")


@dataclass(frozen=True)
class ScoreTable:
    """scores.csv read back: columns by name, NaN where a result did not score a sample."""

    sample_id: torch.Tensor  # (S,) int64, sorted
    is_member: torch.Tensor  # (S,) bool
    model_index: torch.Tensor  # (S,) int64
    scores: dict[str, torch.Tensor]  # result name -> (S,) float64, NaN = not scored

    def column(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, labels) of the samples `name` scored."""
        values = self.scores[name]
        keep = ~values.isnan()
        return values[keep], self.is_member[keep]


def _scored(report: AttackReport) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(name, sample ids, labels, scores) of every result that holds scores."""
    out, seen = [], set()
    for _, r in report.results():
        if r.scores is None or r.labels is None or r.sample_id is None:
            continue
        if r.name in seen or r.name in KEY_COLUMNS:
            raise ValueError(f"scores.csv: two columns named {r.name!r}")
        seen.add(r.name)
        out.append((r.name, r.sample_id.long(), r.labels.bool(), r.scores.double()))
    return out


def render_scores_csv(report: AttackReport) -> bytes:
    """scores.csv of `report` as bytes (see the module docstring)."""
    scored = _scored(report)
    member: dict[int, bool] = {}
    cells: dict[str, dict[int, float]] = {}
    for name, ids, labels, scores in scored:
        for i, y in zip(ids.tolist(), labels.tolist()):
            if member.setdefault(i, y) != y:
                raise ValueError(f"scores.csv: sample {i} is a member for one result, not another")
        cells[name] = dict(zip(ids.tolist(), scores.tolist()))
    model_index = int(report.target.get("model_index", 0))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*KEY_COLUMNS, *cells])
    for i in sorted(member):
        values = [repr(c[i]) if i in c else "" for c in cells.values()]
        writer.writerow([i, int(member[i]), model_index, *values])
    return buf.getvalue().encode("utf-8")


def read_scores(folder: str | os.PathLike) -> ScoreTable:
    """The scores.csv of an attack folder."""
    with open(Path(folder) / SCORES_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1:]
    if tuple(header[: len(KEY_COLUMNS)]) != KEY_COLUMNS:
        raise ValueError(f"{Path(folder) / SCORES_CSV}: header {header[:3]}, not {KEY_COLUMNS}")
    columns = list(zip(*body)) if body else [()] * len(header)
    nan = float("nan")
    return ScoreTable(
        sample_id=torch.tensor([int(v) for v in columns[0]], dtype=torch.long),
        is_member=torch.tensor([v == "1" for v in columns[1]], dtype=torch.bool),
        model_index=torch.tensor([int(v) for v in columns[2]], dtype=torch.long),
        scores={
            n: torch.tensor([float(v) if v else nan for v in c], dtype=torch.float64)
            for n, c in zip(header[3:], columns[3:])
        },
    )
