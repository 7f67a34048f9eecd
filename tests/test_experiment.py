"""`python -m lightning_mia.experiment`: every stage in order, skipped when done, resumed when
interrupted, and one stage in its own process (`isolate`), on the session's tiny experiment
(tests/tiny_experiment.py: made by this command) and copies of it."""

import json
import os
from pathlib import Path

import pytest
import yaml
from tiny_experiment import STEPS, copy_experiment

from lightning_mia.card import CARD_KEY, load_checkpoint
from lightning_mia.cli import train_main
from lightning_mia.experiment import (
    StageConfigs,
    experiment_main,
    fit_stage,
    stage_arguments,
    train_stages,
)
from lightning_mia.models.base import SAMPLES_PNG
from lightning_mia.models.encoder import CARD_FILE
from lightning_mia.paths import done_marker, last_checkpoint
from lightning_mia.stages import StageError, fit_arguments

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # trains through the command lines


def _stages(layout):
    return [
        layout.autoencoder,
        layout.encoder,
        layout.run_dir("diffusion", 0),
        layout.run_dir("diffusion", 1),
        layout.run_dir("diffusion", 2),
    ]


def test_every_stage_runs_in_order_and_reports(diffusion_experiment):
    layout = diffusion_experiment.layout
    for folder in _stages(layout):
        assert json.loads(done_marker(folder).read_text())["global_step"] == STEPS, folder
        assert last_checkpoint(folder).is_file()
    (outcome,) = diffusion_experiment.outcomes
    assert set(outcome.report.attacks) >= {"pixel"} and outcome.folder == layout.attack
    assert json.loads((layout.attack / "report.json").read_text())["num_shadows"] == 2


def test_a_second_run_skips_every_finished_stage(diffusion_experiment, tmp_path, log):
    copy = copy_experiment(diffusion_experiment, tmp_path)
    layout = copy.layout
    before = {f: last_checkpoint(f).stat().st_mtime_ns for f in _stages(layout)}
    experiment_main([str(copy.config)])
    err = log.text
    for folder in _stages(layout):
        assert f"[skip] {folder} is done" in err
        assert last_checkpoint(folder).stat().st_mtime_ns == before[folder]  # not retrained
    assert "is complete; nothing to do" in err  # the queries are not generated again


def _stages_of(config: Path, steps: int, **changes) -> StageConfigs:
    """The training stages of an experiment config, every one trained for `steps`."""
    stages = yaml.safe_load(config.read_text())["stages"]
    trainer = [*stages["trainer_args"][:-1], f"--trainer.max_steps={steps}"]
    return StageConfigs(**{**stages, "trainer_args": trainer, **changes})


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(
    diffusion_experiment, tmp_path, log, capsys
):
    # the experiment's training stages (`train_stages`, which `experiment_main` runs before
    # its queries: test_a_second_run_skips_every_finished_stage) on a copy
    copy = copy_experiment(diffusion_experiment, tmp_path)
    layout = copy.layout
    target = layout.run_dir("diffusion", 0)
    for stage in (target, layout.encoder):  # as if killed after the last checkpoint, before DONE
        done_marker(stage).unlink()
    shadow = layout.run_dir("diffusion", 1)
    shadow_done = done_marker(shadow).read_text()
    stages = _stages_of(copy.config, STEPS + 2)
    common = stage_arguments(layout.root, stages)
    # the shadow's checkpoint is refused as the target's, before any step
    model = yaml.safe_load(copy.config.read_text())["stages"]["model"]
    args = [*common, "--data.model_index=0", f"--model.init_args.autoencoder={layout.autoencoder}"]
    argv = [
        *fit_arguments(target, model, [*args, *stages.model_args])[:-1],
        str(last_checkpoint(shadow)),
    ]
    kept = [f.read_bytes() for f in (last_checkpoint(target), target / "config.yaml")]
    with pytest.raises(SystemExit):
        train_main(argv)
    error = f"--ckpt_path {last_checkpoint(shadow)}: checkpoint is model_index 1 but data."
    assert error in capsys.readouterr().err
    assert [f.read_bytes() for f in (last_checkpoint(target), target / "config.yaml")] == kept
    original = diffusion_experiment.root / target.name / SAMPLES_PNG
    untouched = original.stat().st_mtime_ns
    train_stages(layout, "diffusion", 2, stages, common)
    err = log.text
    assert f"--ckpt_path {last_checkpoint(target)}" in err
    assert "Restoring states from the checkpoint path" in err
    assert json.loads(done_marker(target).read_text())["global_step"] == STEPS + 2  # 2 more
    assert done_marker(shadow).read_text() == shadow_done  # skipped
    # the resumed run writes into the copy, where it now lies, not where it was trained
    saved = load_checkpoint(last_checkpoint(target))[CARD_KEY]
    # its autoencoder too (LightningCLI takes the folder from the checkpoint's hyper-parameters)
    assert (saved["experiment"], saved["autoencoder"]) == (
        str(layout.root),
        str(layout.autoencoder),
    )
    encoder_card = json.loads((layout.encoder / CARD_FILE).read_text())
    assert encoder_card["experiment"] == str(layout.root)
    assert (target / SAMPLES_PNG).stat().st_mtime_ns > untouched
    assert original.stat().st_mtime_ns == untouched


def test_parallel_stages_wait_for_the_autoencoder_alone_and_a_failure_stops_no_other(
    diffusion_experiment, tmp_path, log
):
    """`stages.parallel`: the autoencoder (which every model loads) trains first, alone, with
    every thread; then the models and the encoder, which need nothing of each other, at once,
    each in its own process (`train_stages`, on a copy: the target and the encoder, the fewest
    processes that show the schedule). The encoder's config is broken: its process fails, the
    target beside it still finishes, and the error names the stage and its exit code."""
    copy = copy_experiment(diffusion_experiment, tmp_path, ("splits.json", "autoencoder"))
    layout = copy.layout
    done_marker(layout.autoencoder).unlink()  # as if interrupted: it resumes for 2 more steps
    encoder = yaml.safe_load((ROOT / "configs/encoder/tiny.yaml").read_text())
    encoder["model"]["init_args"]["no_such_argument"] = 1
    bad = tmp_path / "encoder-bad.yaml"
    bad.write_text(yaml.safe_dump(encoder))
    stages = _stages_of(copy.config, STEPS + 2, parallel=2, encoder=str(bad))
    common = stage_arguments(layout.root, stages)
    with pytest.raises(StageError, match=r"stages did not finish: encoder failed \(exit code 2\)"):
        train_stages(layout, "diffusion", 0, stages, common)
    target = layout.run_dir("diffusion", 0)
    for folder in (layout.autoencoder, target):  # the target trained anew on the new autoencoder
        assert json.loads(done_marker(folder).read_text())["global_step"] == STEPS + 2, folder
    assert not done_marker(layout.encoder).exists()
    lines = [r.getMessage() for r in log.records if r.getMessage().startswith("[fit] ")]
    lines = list(dict.fromkeys(lines))  # (caught once by each handler)
    cpus = os.cpu_count() or 1
    rest = "diffusion-target-000, encoder"
    first = lines.index(f"[fit] autoencoder: 1 at once, {cpus} thread(s) each")
    assert lines[first + 1].startswith("[fit] autoencoder done in")  # before any model starts
    assert lines.index(f"[fit] {rest}: 2 at once, {max(1, cpus // 2)} thread(s) each") > first
    # one stage in its own process (`isolate`): its failure is one StageError too
    with pytest.raises(StageError, match="stage encoder failed"):
        fit_stage(layout.encoder, str(bad), common, isolate=True)
    model = yaml.safe_load(copy.config.read_text())["stages"]["model"]
    args = [*common, "--data.model_index=0", f"--model.init_args.autoencoder={layout.autoencoder}"]
    assert fit_arguments(target, model, [*args, *stages.model_args]) is None  # done: nothing to do
