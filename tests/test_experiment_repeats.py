"""`repeats: 2` on a tiny experiment: two complete experiments with their own splits and seeds,
and the summary beside repeat 0's report (about two tiny experiments' time)."""

import json

import pytest
from tiny_experiment import experiment_config, write_config

from lightning_mia.attack.repeats import REPEATS_JSON, REPEATS_MD
from lightning_mia.experiment import experiment_main

pytestmark = pytest.mark.slow  # trains two experiments through the command lines


def test_two_repeats_and_their_summary(tmp_path, capsys):
    # one shadow (LiRA is skipped: the attack stage is the cheapest), 2 steps per stage
    config = experiment_config(tmp_path / "exp", steps=2, num_shadows=1, repeats=2)
    path = write_config(tmp_path / "repeats.yaml", config)
    outcomes = experiment_main([str(path)])
    assert [o.layout.root for o in outcomes] == [tmp_path / "exp", tmp_path / "exp" / "repeat-01"]
    first, second = (json.loads(o.layout.splits.read_text()) for o in outcomes)
    assert (first["seed"], second["seed"]) == (0, 1) and first["hash"] != second["hash"]
    assert outcomes[1].report.seeds["attack"] == 1
    summary = json.loads((tmp_path / "exp" / "attack" / REPEATS_JSON).read_text())
    assert summary["repeats"] == 2 and summary["seeds"] == [0, 1]
    auc = summary["results"]["pixel"]["metrics"]["auc"]
    assert auc["values"] == [o.report.attacks["pixel"].metrics["auc"].value for o in outcomes]
    assert (tmp_path / "exp" / "attack" / REPEATS_MD).is_file()
    out = capsys.readouterr().out
    assert "2 repeats (seeds [0, 1])" in out and "±" in out
    for outcome in outcomes:  # every report carries its scores; LiRA needs > 1 shadow
        assert (outcome.folder / "scores.csv").is_file()
        assert "lira-offline-pixel" not in outcome.report.attacks
        assert any("LiRA skipped: one shadow model" in n for n in outcome.report.notes)
