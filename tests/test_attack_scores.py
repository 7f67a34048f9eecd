"""scores.csv beside the report: every AUC and TPR@1%FPR of report.json recomputed from it with
scikit-learn, in both settings."""

import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve
from test_attack_lira import FAST, world  # noqa: F401  (the fixture)

from lightning_mia.attack.render import REPORT_JSON, write_report
from lightning_mia.attack.runner import run_attacks
from lightning_mia.attack.scores import SCORES_CSV, read_scores


def _recompute(folder):
    doc = json.loads((folder / REPORT_JSON).read_text())
    table = read_scores(folder)
    results = {**doc["attacks"], **doc["baselines"]}
    assert set(table.scores) == set(results)
    for name, result in results.items():
        scores, labels = (t.numpy() for t in table.column(name))
        metrics = result["metrics"]
        assert roc_auc_score(labels, scores) == pytest.approx(metrics["auc"]["value"], abs=1e-12)
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        within = fpr < 0.01 - 1e-12  # read strictly below the budget
        tpr1 = metrics["tpr@1%fpr"]
        assert tpr1["resolvable"] == ((~labels).sum() >= 100), name
        if not tpr1["resolvable"]:
            continue
        assert tpr[within].max() == pytest.approx(tpr1["value"], abs=1e-12), name
        best = np.flatnonzero(within)[-1]  # the lowest threshold below the budget
        assert round(fpr[best] * (~labels).sum()) == tpr1["false_positives"], name
    return doc, table


def test_every_figure_recomputes_from_the_scores_file(world):  # noqa: F811
    layout, target, shadows, calibration = world
    report = run_attacks(
        layout, target, shadows, ["pixel", "combined"], calibration=calibration, **FAST
    )
    write_report(layout.attack, report)
    doc, table = _recompute(layout.attack)
    assert {"pixel", "lira-offline-pixel", "threshold", "blind"} <= set(table.scores)
    assert table.model_index.unique().tolist() == [0] and len(table.sample_id) == 200
    assert (layout.attack / SCORES_CSV).read_text().startswith("sample_id,is_member,model_index,")


def test_partial_setting_scores_part_of_the_rows(world):  # noqa: F811
    layout, target, _, _ = world
    report = run_attacks(
        layout, target, [], ["pixel"], setting="partial", known_fraction=0.25, **FAST
    )
    write_report(layout.report_dir("partial"), report)
    doc, table = _recompute(layout.report_dir("partial"))
    assert not doc["attacks"]["pixel"]["metrics"]["tpr@1%fpr"]["resolvable"]  # 75 non-members
    assert doc["baselines"]["blind"]["metrics"]["tpr@1%fpr"]["resolvable"]  # all 100
    assert int(table.scores["pixel"].isnan().sum()) == 50  # the known quarter is not tested
    assert int(table.scores["blind"].isnan().sum()) == 0  # the diagnostic scores every row
