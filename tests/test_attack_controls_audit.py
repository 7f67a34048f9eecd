"""What the attack command reports beside the per-sample attacks, on synthetic query tables:
the controls (fixed and swapped captions), the set-level audit, and the report files and
terminal table that carry them."""

import json
from dataclasses import replace

import pytest
import torch
from test_attack_runner import FAST, _write_table

from lightning_mia.attack.audit import check_audit
from lightning_mia.attack.controls import control_aucs, control_specs, survival
from lightning_mia.attack.options import AttackOptions
from lightning_mia.attack.render import REPORT_JSON, REPORT_MD, format_table, write_report
from lightning_mia.attack.report import read_report
from lightning_mia.attack.runner import run_attacks
from lightning_mia.data import ShapesSource, ensure_splits
from lightning_mia.errors import UserError
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.shards import QueryTable
from lightning_mia.setlevel import AuditOptions, DatasetInferenceResult, audit_tables
from lightning_mia.specs.query import QuerySpec


def _scrambled(table: QueryTable, seed: int) -> QueryTable:
    """The same samples with every non-blind feature permuted among them: what an attack sees
    when the caption no longer belongs to the image and it needed the pair."""
    perm = torch.randperm(len(table), generator=torch.Generator().manual_seed(seed))
    features = {k: (v if k.startswith("blind/") else v[perm]) for k, v in table.features.items()}
    return replace(table, features=features)


@pytest.fixture
def world(tmp_path):
    layout = ExperimentLayout(tmp_path / "exp")
    return layout, _write_table(layout, 0), [_write_table(layout, 1), _write_table(layout, 2)]


def test_control_specs_change_only_the_captions():
    query = QuerySpec(num_images=2, signals=("loss",), captioner="", seed=3)
    specs = control_specs(query)
    assert set(specs) == {"fixed-caption", "swapped-caption"}
    for mode, spec in specs.items():
        assert spec.captions == mode and spec.with_updates(captions="ground-truth") == query
        assert spec.tag == f"@{mode}"


@pytest.mark.slow
def test_controls_score_the_trained_attacks_on_the_control_queries(world, log):
    layout, target, shadows = world
    trained = {}  # as the attack stage shares it between the main report and its controls

    def attack_on(table):
        return run_attacks(layout, table, shadows, ["pixel"], trained=trained, **FAST)

    written = {}
    main = attack_on(target)
    fitted = trained["pixel"][0]
    kept_target = replace(
        target,
        record=replace(target.record, spec=control_specs(target.record.spec)["fixed-caption"]),
    )
    controls = {"fixed-caption": kept_target, "swapped-caption": _scrambled(target, 1)}
    aucs = control_aucs(attack_on, controls, target.record.spec, written.__setitem__)
    assert set(written) == set(controls) and written["swapped-caption"].captions == (
        "swapped-caption"
    )
    said = [r.getMessage() for r in log.records if "control:" in r.getMessage()]
    scored = [r.getMessage() for r in log.records if "scored with" in r.getMessage()]
    assert scored and all(m.startswith("attacks pixel: scored with the trained") for m in scored)
    assert said[0].startswith("[attack] fixed-caption control: the same attacks on the target")
    assert said[-1].endswith("swapped captions (each sample queried with another sample's caption)")
    full = main.attacks["pixel"].metrics["auc"].value
    assert full > 0.9
    # the same features: the whole lift survives; scrambled pairs: none of it
    assert aucs["fixed-caption"]["pixel"] == pytest.approx(full, abs=1e-6)
    assert abs(survival(full, aucs["swapped-caption"]["pixel"])) < 0.35
    assert trained["pixel"][0] is fitted  # the controls were scored by it, not by a refit
    partial = {}  # the partial setting trains on part of the target's own (control) table
    run_attacks(layout, target, shadows, ["pixel"], setting="partial", trained=partial, **FAST)
    assert partial == {}
    assert survival(None, 0.7) is None and survival(0.5, 0.7) is None
    assert survival(0.53, 0.6) is None and survival(0.4, 0.45) == pytest.approx(0.5)


def test_report_files_and_table_carry_controls_and_the_audit(world):
    layout, target, shadows = world
    report = run_attacks(layout, target, shadows, ["pixel"], **FAST)
    report.controls = {"fixed-caption": {"pixel": 0.6}, "swapped-caption": {"pixel": 0.5}}
    result = audit_tables(target, shadows, options=AuditOptions(subset_repeats=5))
    report.dataset_inference = result.to_dict()
    folder = layout.attack
    write_report(folder, report)
    again = read_report(folder)
    assert again.controls == report.controls
    assert again.dataset_inference == json.loads(json.dumps(result.to_dict()))
    assert DatasetInferenceResult.from_dict(again.dataset_inference).decision == result.decision
    markdown = (folder / REPORT_MD).read_text()
    assert "## Controls" in markdown and "kept" in markdown
    assert "fixed-caption" in (folder / REPORT_JSON).read_text()
    lines = format_table(report).splitlines()
    start = lines.index("controls: AUC with other captions, and the share of the lift kept")
    control = lines[start + 1 : start + 2 + len(report.attacks) + len(report.baselines)]
    assert control[0].split()[:3] == ["row", "AUC", "AUC"]
    assert any(ln.split()[0] == "pixel" and "20%" in ln for ln in control)  # 0.6 of 1.0: 20%
    assert any("dataset inference" in ln.lower() for ln in lines[start:])


def test_a_missing_group_column_is_refused_before_any_query(tmp_path):
    layout = ExperimentLayout(tmp_path / "exp")
    ensure_splits(
        layout,
        ShapesSource(num_samples=60, resolution=8),
        num_shadows=1,
        target_size=20,
        aux_size=20,
        shadow_size=20,
    )
    options = AttackOptions(dataset_inference=True, group_by="artist")
    with pytest.raises(UserError, match="no per-sample column 'artist'"):
        check_audit(layout, options)
    with pytest.raises(UserError, match="--group-by needs --dataset-inference"):
        check_audit(layout, AttackOptions(group_by="artist"))
    with pytest.raises(UserError, match="alpha must lie strictly between 0 and 1"):
        check_audit(layout, AttackOptions(dataset_inference=True, audit=AuditOptions(alpha=2)))


@pytest.mark.slow
def test_a_target_trained_four_steps_detects_nothing(diffusion_experiment, tmp_path, capsys):
    """`attack.py --dataset-inference` on the session's diffusion experiment, whose target and
    shadows trained 4 steps: there is no membership to find, and the audit (aggregation fitted
    on the shadows, tested on the target's 8 members against its 7 non-members) must not claim
    any. Its queries are reused: the same query as the experiment's."""
    from tiny_experiment import copy_experiment

    from lightning_mia.cli import attack_main

    exp = copy_experiment(diffusion_experiment, tmp_path)
    attack_main(
        [
            "--ckpt",
            str(exp.layout.checkpoint("diffusion", 0)),
            "--query.num_images=1",
            "--query.signals=[loss]",
            "--attack.attacks=[pixel, loss]",
            "--attack.max_epochs=5",
            "--progress=false",
            "--dataset-inference",
        ]
    )
    out = capsys.readouterr().out
    assert "querying" not in out  # every query reused
    result = json.loads((exp.root / "attack" / "dataset_inference.json").read_text())
    assert result["decision"] != "detected" and result["p_value"] > 0.01, result
    calibrated = result["calibrated"]  # the second test, on the LiRA rows, finds nothing either
    assert set(calibrated["rows"]) == {"lira-offline-pixel", "lira-offline-loss"}, calibrated
    assert calibrated["p_value"] > 0.01 and "Calibrated scores (second test" in out
    # every shadow was queried on the target's samples: the main test is difficulty-calibrated
    assert result["difficulty_models"] == len(exp.layout.finished_runs("diffusion", "shadow"))
    assert result["difficulty_models"] >= 2 and result["uncalibrated"]["p_value"] > 0.01
    assert "Without difficulty calibration" in out
    # the aggregation on the shadow it did not see: shadows of 4 steps have nothing to learn
    auc, p_value = result["shadow_transfer"]
    assert p_value > 0.001 and auc < 0.8 and "left-out shadows" in out


def test_a_control_report_names_the_captions_it_read(world):
    from lightning_mia.attack.render import caption_mode

    layout, target, shadows = world
    report = run_attacks(layout, target, shadows, ["pixel"], **FAST)
    assert caption_mode(report) == "ground-truth captions"
    fixed = replace(report, captions="fixed-caption", query={"fixed_caption": "an image"})
    assert caption_mode(fixed) == "one fixed caption for every sample ('an image')"
    swapped = replace(report, captions="swapped-caption")
    assert caption_mode(swapped).startswith("swapped captions (each sample queried with another")
