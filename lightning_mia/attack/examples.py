"""examples.png: what the attack looks at, for the target's members and non-members.

    png = examples_png(layout.report_dir("shadow"), report)  # bytes, or None without examples

Each row is one test sample of the target whose pictures its query kept
(`query.writer.read_examples`): the query image (a training image for a member), then its N
generations, each titled with its pixel MSE to the query (in [0, 1] units, what the pixel attack
reads), and on the right membership, the attack's score and rank, and the caption. Rows are
ranked by the score of the black-box attack with the best AUC (any attack's if none is
black-box): the highest-scoring at the top, the lowest-scoring at the bottom (at most
`ROWS_PER_END` of each).
"""

from __future__ import annotations

import io
import os
import textwrap
from pathlib import Path
from typing import Any

import torch

from lightning_mia.attack.report import AttackReport, AttackResult
from lightning_mia.features.pixel import match_resolution
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.writer import read_examples
from lightning_mia.specs.query import caption_tag

EXAMPLES_PNG = "examples.png"
ROWS_PER_END = 4  # highest- and lowest-scoring rows shown
CAPTION_WIDTH = 36  # characters per caption line


def ranking_result(report: AttackReport) -> AttackResult | None:
    """The attack (not a baseline) with per-sample scores and the highest AUC, among the
    black-box ones (they read the generations shown) if there are any."""
    scored = [
        r for r in report.attacks.values() if r.scores is not None and r.sample_id is not None
    ]
    if not scored:
        return None
    scored = [r for r in scored if r.access == "black-box"] or scored

    def auc(r: AttackResult) -> float:
        metric = r.metrics.get("auc")
        return metric.value if metric is not None and metric.value is not None else -1.0

    return max(scored, key=auc)


def pick_rows(result: AttackResult, kept: set[int]) -> list[dict[str, Any]]:
    """The kept test samples to draw, highest score first: {sample_id, score, rank, member}."""
    order = torch.argsort(result.scores.float(), descending=True)  # (S,)
    rows = []
    for rank, i in enumerate(order.tolist(), start=1):
        sid = int(result.sample_id[i])
        if sid in kept:
            rows.append(
                {
                    "sample_id": sid,
                    "score": float(result.scores[i]),
                    "rank": rank,
                    "member": bool(result.labels[i]),
                }
            )
    if len(rows) > 2 * ROWS_PER_END:
        rows = rows[:ROWS_PER_END] + rows[-ROWS_PER_END:]
    return rows


def generation_mse(query: torch.Tensor, generated: torch.Tensor) -> torch.Tensor:
    """uint8 query (H, W, 3) and generations (N, H', W', 3) -> MSE of each, (N,), in [0, 1]
    units (the query resized to the generated resolution, as the pixel features do)."""
    q = query.permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    g = generated.permute(0, 3, 1, 2).float() / 255  # (N, 3, H', W')
    q = match_resolution(q, tuple(g.shape[-2:]))
    return ((g - q) ** 2).mean(dim=(1, 2, 3))


def render_examples(report: AttackReport, examples: dict[int, dict[str, Any]]) -> bytes | None:
    """PNG bytes of the examples figure, or None when no kept example was a test sample."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    result = ranking_result(report)
    rows = pick_rows(result, set(examples)) if result is not None else []
    if not rows:
        return None
    n = max(examples[r["sample_id"]]["generated"].shape[0] for r in rows)
    fig = Figure(figsize=(1.25 * (n + 1) + 3.2, 1.35 * len(rows) + 0.8), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), n + 2, width_ratios=[1] * (n + 1) + [2.6])
    for row, info in enumerate(rows):
        example = examples[info["sample_id"]]
        mse = generation_mse(example["query"], example["generated"])
        pictures = [("query", example["query"])]
        pictures += [(f"MSE {m:.4f}", g) for m, g in zip(mse.tolist(), example["generated"])]
        for col, (title, image) in enumerate(pictures):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(image.numpy())
            ax.set_title(title, fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        text = fig.add_subplot(grid[row, n + 1])
        text.axis("off")
        who = "member" if info["member"] else "non-member"
        caption = textwrap.shorten(example["caption"], 3 * CAPTION_WIDTH, placeholder="...")
        lines = [
            f"{who} #{info['sample_id']}",
            f"score {info['score']:.4g}, rank {info['rank']}/{len(result.scores)}",
            *textwrap.wrap(caption, CAPTION_WIDTH),
        ]
        text.text(
            0,
            0.5,
            "\n".join(lines),
            fontsize=7,
            va="center",
            color="tab:green" if info["member"] else "tab:red",
        )
    auc = result.metrics.get("auc")
    auc_text = f", AUC {auc.value:.3f}" if auc is not None and auc.value is not None else ""
    fig.suptitle(
        f"{report.target.get('run_name', 'target')}: ranked by {result.name}{auc_text}"
        " (highest scores at the top)",
        fontsize=9,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _experiment_root(folder: Path) -> Path | None:
    """The experiment folder above a report folder (`attack/` or `attack/<setting>/`)."""
    for parent in [folder, *folder.parents][:4]:
        if ExperimentLayout(parent).splits.is_file():
            return parent
    return None


def examples_png(folder: str | os.PathLike, report: AttackReport) -> bytes | None:
    """examples.png of a report to be written into `folder`, from the target's query folder;
    None when that query kept no examples (or the experiment folder is not found)."""
    root = _experiment_root(Path(folder).resolve())
    run_name = report.target.get("run_name")
    if root is None or not run_name:
        return None
    tag = caption_tag(report.captions, report.captioner.get("folder", ""))
    queries = ExperimentLayout(root).queries(run_name, tag)
    examples = read_examples(queries)
    return render_examples(report, examples) if examples else None
