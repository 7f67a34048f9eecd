"""The whole pipeline at a small size, for each family: autoencoder -> attacker's encoder ->
target + shadow -> queries of every attack -> attack.py, through the real command lines, on a
copy of the session's tiny experiment of the family (tests/tiny_experiment.py) with one shadow.

The query stage's other guarantees on trained models live beside the tests of their kind: every
sample exactly once under 2-process DDP in test_multi_device.py, kill-and-resume equal to one run
in test_kill_resume.py, one clear error per bad input in test_user_errors.py.
"""

import json
import math

import pytest
from tiny_experiment import TARGET_SIZE, copy_experiment

from lightning_mia.cli import attack_main

pytestmark = pytest.mark.slow  # trains through the command lines (the session experiments)

GRAYBOX = {  # learned classifiers, the papers' statistics, complexity-calibrated scores
    "diffusion": {"loss-mlp", "secmi-mlp", "pia-mlp", "clid-mlp"}
    | {"loss-t100", "secmi-stat", "pia-t200", "clid-th"}
    | {"loss-cc", "secmi-cc", "pia-cc"},
    "seq2seq": {"nll-mlp", "nll_gap-mlp", "nll-cc"},
}


@pytest.mark.parametrize("family", ["diffusion", "seq2seq"])
def test_attack_command_end_to_end(family, request, tmp_path, capsys, log):
    base = request.getfixturevalue(f"{family}_experiment")
    runs = (f"{family}-target-000", f"{family}-shadow-001")  # one shadow, nothing queried
    experiment = copy_experiment(base, tmp_path, ("splits.json", "autoencoder", "encoder", *runs))
    exp = experiment.root
    log.clear()  # (the session experiment may have been built just now)
    attack_main(
        [
            "--ckpt",
            str(experiment.layout.checkpoint(family, 0)),
            "--query.num_images=1",
            "--attack.max_epochs=5",
            "--progress=false",
            "--attack.attacks",
            '["all"]',
        ]
    )
    out = capsys.readouterr().out
    assert "blind (diagnostic)" in out and "threshold (baseline)" in out
    report = json.loads((exp / "attack" / "report.json").read_text())
    assert report["family"] == family and report["setting"] == "shadow"
    assert report["num_shadows"] == 1 and report["num_images"] == 1
    attacks = {"pixel", "semantic", "text", "combined", "pixel-cc"} | GRAYBOX[family]
    assert set(report["attacks"]) == attacks  # LiRA needs >= 2 shadows (a variance)
    assert any("LiRA skipped: one shadow model gives no variance" in n for n in report["notes"])
    complete = exp / "queries" / f"{family}-shadow-001" / "row-000" / "COMPLETE.json"
    sampler = json.loads(complete.read_text())["record"]["sampler"]  # its generated images'
    assert sampler == {"diffusion": "", "seq2seq": "2"}[family]
    done = list(dict.fromkeys(r.getMessage() for r in log.records if "done in" in r.getMessage()))
    reused = [line for line in done if "image encodings reused" in line]  # the target's images,
    assert len(reused) == 1 and "row 0" in reused[0], done  # encoded for the target, again
    assert (exp / "attack" / "scores.csv").is_file()
    assert set(report["baselines"]) == {"threshold", "blind", "blind-caption"}
    assert report["test_samples"] == {"members": 8, "non_members": TARGET_SIZE - 8}
    for name, result in {**report["attacks"], **report["baselines"]}.items():
        assert result["access"] in ("black-box", "gray-box", "none"), name
        metrics = result["metrics"]
        for key in ("accuracy", "auc"):
            assert math.isfinite(metrics[key]["value"]), (name, key)
            assert metrics[key]["low"] <= metrics[key]["value"] <= metrics[key]["high"]
        assert metrics["tpr@1%fpr"]["resolvable"] is False  # 7 non-members < 100
    assert (exp / "attack" / "roc.png").stat().st_size > 0
    assert "| attack" in (exp / "attack" / "report.md").read_text()
