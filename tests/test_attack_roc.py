"""roc.png's panels and the table's realised column, on results built in code (CPU, seconds)."""

import io

import torch
from PIL import Image

from lightning_mia.attack.render import REALISED_LABEL, format_table, render_markdown
from lightning_mia.attack.report import AttackReport, AttackResult, Realised
from lightning_mia.attack.roc import MAX_CURVES, panels, render_roc_png
from lightning_mia.metrics import evaluate


def _result(name, access, statistic, shift, seed, realised=True):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(400) % 2 == 0
    scores = torch.randn(400, generator=g) + shift * labels
    cut = Realised.chosen((scores, labels), (scores, labels), "training rows") if realised else None
    return AttackResult(
        name,
        access,
        4,
        evaluate(scores, labels, 0.0, n_boot=10),
        ["x"],
        scores=scores,
        labels=labels,
        sample_id=torch.arange(400),
        attack=name.split("-")[0],
        statistic=statistic,
        realised=cut,
    )


def _report():
    rows = [("pixel", "black-box", "learned"), ("semantic", "black-box", "learned")]
    rows += [(f"{a}-mlp", "gray-box", "learned") for a in ("loss", "secmi", "pia", "clid")]
    rows += [(n, "gray-box", "reference") for n in ("loss-t100", "secmi-stat", "pia-t200")]
    rows += [(f"{a}-cc", "gray-box", "calibrated") for a in ("loss", "secmi", "pia")]
    names = ("pixel", "semantic", "text", "combined", "loss", "secmi", "pia", "clid", "x", "y")
    rows += [(f"lira-offline-{a}", "gray-box", "calibrated") for a in names]  # 10 > 8
    attacks = {n: _result(n, a, s, 0.2 * (i % 7), i) for i, (n, a, s) in enumerate(rows)}
    baselines = {
        "threshold": _result("threshold", "black-box", "baseline", 0.5, 90),
        "blind": _result("blind", "none", "diagnostic", 0.0, 91, realised=False),
    }
    baselines["blind"].details["diagnostic"] = True
    return AttackReport("shadow", "diffusion", 4, 4, {}, "h", {}, attacks, baselines)


def test_panels_by_access_hold_at_most_eight_curves_each():
    groups = panels(_report())
    titles = [t for t, _ in groups]
    assert titles == [
        "black-box",
        "gray-box, learned",
        "gray-box, the papers' statistics",
        "complexity-calibrated",
        "LiRA offline (1/2)",
        "LiRA offline (2/2)",
    ]
    assert all(0 < len(curves) <= MAX_CURVES for _, curves in groups)
    assert [len(c) for _, c in groups][-2:] == [5, 5]  # split evenly
    black = [r.name for _, r in groups[0][1]]
    assert black[-2:] == ["threshold", "blind"]  # baselines after the attacks
    aucs = [r.metrics["auc"].value for _, r in groups[1][1]]
    assert aucs == sorted(aucs, reverse=True)  # legend order = AUC order
    drawn = [r.name for _, curves in groups for _, r in curves]
    assert len(drawn) == len(set(drawn)) == 24  # every scored row once


def test_roc_png_renders_every_panel():
    image = Image.open(io.BytesIO(render_roc_png(_report())))
    assert image.format == "PNG" and image.height > image.width > 800  # 3 rows of 2 panels


def test_table_and_markdown_show_the_realised_cut():
    report = _report()
    table = format_table(report)
    header = table.splitlines()[1]
    assert header.rstrip().endswith(REALISED_LABEL)
    pixel = next(line for line in table.splitlines() if line.startswith("pixel "))
    realised = report.attacks["pixel"].realised
    assert pixel.rstrip().endswith(f"{realised.fpr:.3f} / {realised.tpr:.3f}")
    blind = next(line for line in table.splitlines() if line.startswith("blind (diagnostic)"))
    assert blind.rstrip().endswith("-")
    assert f"`{REALISED_LABEL}`: the threshold an attacker would deploy" in render_markdown(report)
