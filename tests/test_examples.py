"""examples.png: the query keeps the pictures of a few samples (by id), the report draws them
ranked by the attack's score, and report.md shows the picture."""

import torch

from lightning_mia.attack.examples import (
    EXAMPLES_PNG,
    examples_png,
    generation_mse,
    pick_rows,
    ranking_result,
    render_examples,
)
from lightning_mia.attack.render import write_report
from lightning_mia.attack.report import REPORT_MD, AttackReport, AttackResult
from lightning_mia.metrics import evaluate
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.writer import ShardWriter, read_examples
from lightning_mia.specs.query import QueryRecord


class _Trainer:
    global_rank = 0


def _prediction(ids, n=3, size=8):
    b = len(ids)
    g = torch.Generator().manual_seed(0)
    query = torch.rand(b, 3, size, size, generator=g) * 2 - 1
    generated = (query[:, None] + 0.1 * torch.arange(n).view(1, n, 1, 1, 1)).clamp(-1, 1)
    return {
        "sample_id": torch.tensor(ids),
        "is_member": torch.tensor([i % 2 == 0 for i in ids]),
        "model_index": 0,
        "features": {"pixel/x": torch.randn(b, generator=g)},
        "query": query,
        "generated": generated,  # generation k is the query shifted by 0.1 k
        "caption": [f"caption {i}" for i in ids],
    }


def test_the_writer_keeps_the_pictures_of_the_example_ids(tmp_path):
    writer = ShardWriter(tmp_path, QueryRecord(run_name="x"), example_ids=[2, 5, 11])
    for ids in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9]):
        writer.write_on_batch_end(_Trainer(), None, _prediction(ids), None, None, 0)
    examples = read_examples(tmp_path)
    assert sorted(examples) == [2, 5]  # 11 was never queried
    example = examples[5]
    assert example["query"].shape == (8, 8, 3) and example["query"].dtype == torch.uint8
    assert example["generated"].shape == (3, 8, 8, 3) and example["caption"] == "caption 5"
    assert len(list(tmp_path.glob("shard-*"))) == 3 and len(list(tmp_path.glob("examples-*"))) == 2
    mse = generation_mse(example["query"], example["generated"])
    assert mse[0] < 1e-4 and mse[0] < mse[1] < mse[2]  # farther from the query, larger MSE


def _report(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2 == 0
    ids = torch.arange(n) * 3
    results = {}
    for name, shift, access in (("pixel", 2.0, "black-box"), ("loss", 4.0, "gray-box")):
        scores = torch.randn(n, generator=g) + shift * labels
        metrics = evaluate(scores, labels, threshold=0.0, n_boot=10)
        results[name] = AttackResult(
            name, access, 4, metrics, ["x"], scores=scores, labels=labels, sample_id=ids
        )
    return AttackReport(
        setting="shadow",
        family="diffusion",
        num_images=3,
        num_shadows=1,
        seeds={},
        splits_hash="h",
        target={"run_name": "diffusion-target-000"},
        attacks=results,
        baselines={},
    )


def test_rows_are_the_kept_samples_ranked_by_the_best_black_box_attack():
    report = _report()
    result = ranking_result(report)
    assert result.name == "pixel"  # loss has the higher AUC, but reads no generated image
    kept = set(range(0, 120, 3))  # every test sample was kept
    rows = pick_rows(result, kept)
    assert len(rows) == 8
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == float(result.scores.max()) and scores[-1] == float(result.scores.min())
    assert [r["rank"] for r in rows[:4]] == [1, 2, 3, 4] and rows[-1]["rank"] == 40
    assert pick_rows(result, {3, 6, 999}) and len(pick_rows(result, {3, 6, 999})) == 2


def test_the_report_holds_examples_png_when_the_target_query_kept_examples(tmp_path):
    layout = ExperimentLayout(tmp_path / "exp")
    layout.root.mkdir()
    layout.splits.write_text("{}")
    report = _report()
    assert examples_png(layout.attack, report) is None  # no query folder yet
    write_report(layout.attack, report)
    assert not (layout.attack / EXAMPLES_PNG).exists()
    assert EXAMPLES_PNG not in (layout.attack / REPORT_MD).read_text()
    folder = layout.queries("diffusion-target-000")
    writer = ShardWriter(folder, QueryRecord(), example_ids=[0, 3, 6, 7])
    writer.write_on_batch_end(_Trainer(), None, _prediction([0, 3, 6, 7]), None, None, 0)
    png = render_examples(report, read_examples(layout.queries("diffusion-target-000")))
    assert png[:4] == b"\x89PNG"
    write_report(layout.attack, report)
    assert (layout.attack / EXAMPLES_PNG).read_bytes()[:4] == b"\x89PNG"
    assert f"![examples]({EXAMPLES_PNG})" in (layout.attack / REPORT_MD).read_text()
    partial = layout.report_dir("partial")
    write_report(partial, report)  # attack/partial/ finds the same experiment
    assert (partial / EXAMPLES_PNG).is_file()
