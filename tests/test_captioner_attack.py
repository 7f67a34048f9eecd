"""The image-only attacker end to end, at tiny size: a captioner trained on the experiment's
public pool (the session's, tests/tiny_experiment.py), then the experiment runner with
`captioner:` and both caption modes (ground-truth and captioner) on a copy, then
`attack.py --captioner` with a saved random-init BLIP folder; and every bad captioner refused
by the real command line in one line, with nothing written."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny_blip import tiny_blip_folder
from tiny_experiment import (
    CAPTIONER,
    CAPTIONER_STEPS,
    NUM_SAMPLES,
    RESOLUTION,
    copy_experiment,
    experiment_config,
    fit_args,
)

from lightning_mia.cli import attack_main, train_main
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.experiment import experiment_main
from lightning_mia.graybox import compute_signals
from lightning_mia.models.captioner import Captioner
from lightning_mia.models.registry import load_family_module
from lightning_mia.query.shards import load_query_table, read_complete
from lightning_mia.query.writer import read_examples

SOURCE = dict(num_samples=NUM_SAMPLES, resolution=RESOLUTION, seed=0)
TARGET = "diffusion-target-000"


def _config(tmp: Path, exp: Path, base: Path) -> Path:
    """The session experiment's config with the captioner stage and both caption modes."""
    config = yaml.safe_load(base.read_text())
    config["stages"]["captioner"] = CAPTIONER
    config.update(experiment=str(exp), captions=["ground-truth", "captioner"])
    path = tmp / "captioner-experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished(captioner_experiment, tmp_path_factory):
    """A copy of the session experiment with its captioner (48 steps: it writes the shapes
    grammar), then the experiment command (which finds every stage and the ground-truth
    queries done) with both caption modes; the terminal output kept."""
    tmp = tmp_path_factory.mktemp("image-only")
    copy = copy_experiment(captioner_experiment, tmp)
    capture = pytest.MonkeyPatch()
    lines: list[str] = []
    capture.setattr("lightning_mia.experiment.say", lines.append)
    try:
        outcomes = experiment_main([str(_config(tmp, copy.root, copy.config))])
    finally:
        capture.undo()
    return tmp, copy.layout, outcomes, "\n".join(lines)


@pytest.mark.slow
def test_both_caption_modes_are_reported_side_by_side(finished):
    _, layout, outcomes, said = finished
    truth, captioned = (o.report for o in outcomes)
    assert (truth.captions, captioned.captions) == ("ground-truth", "captioner")
    assert outcomes[0].folder == layout.attack
    assert outcomes[1].folder == layout.attack / "shadow@captioner"
    doc = json.loads((outcomes[1].folder / "report.json").read_text())
    assert doc["captions"] == "captioner"
    assert doc["captioner"]["folder"] == str(layout.captioner.resolve())
    assert (
        doc["captioner"]["train_steps"] == CAPTIONER_STEPS and "bleu" in doc["captioner"]["quality"]
    )
    assert json.loads((layout.attack / "report.json").read_text())["captions"] == "ground-truth"
    assert (
        f"query captions: captioner captions (captioner, {CAPTIONER_STEPS} steps"
        in (outcomes[1].folder / "report.md").read_text()
    )
    assert (
        f"ground-truth captions vs captioner captions (captioner, {CAPTIONER_STEPS} steps" in said
    )
    rows = {"pixel", "loss-mlp", "loss-t100"}
    assert rows <= set(truth.attacks) and rows <= set(captioned.attacks)


@pytest.mark.slow
def test_every_signal_reads_the_captioners_captions(finished):
    """The captioner queries (own folder, beside the ground-truth ones) hold the captioner's
    captions of the images, and the gray-box loss is that of those captions."""
    _, layout, _, _ = finished
    plain, mine = layout.queries(TARGET), layout.queries(TARGET, "@captioner")
    assert read_complete(plain).spec.captions == "ground-truth"
    assert read_complete(mine).spec.captions == "captioner"
    assert read_complete(mine).spec.captioner == "captioner"  # relative to the experiment
    examples = read_examples(mine)
    ids = sorted(examples)[:4]
    source = ShapesSource(**SOURCE)
    images = torch.stack([source.image(i) for i in ids])  # (4, 3, 32, 32)
    captions = Captioner(str(layout.captioner)).caption(images)
    assert [examples[i]["caption"] for i in ids] == captions
    assert captions != [source.caption(i) for i in ids]  # not the ground truth
    model = load_family_module(str(layout.checkpoint("diffusion", 0))).requires_grad_(False)
    batch = {"pixel_values": images, "sample_id": torch.tensor(ids), "caption": captions}
    expected = compute_signals(model, batch, ["loss"], seed=0)
    table, truth = load_query_table(mine), load_query_table(plain)
    rows = [int((table.sample_id == i).nonzero()) for i in ids]
    for name, values in expected.items():
        torch.testing.assert_close(table.features[name][rows], values.float(), atol=1e-5, rtol=0)
        assert not torch.allclose(truth.features[name][rows], values.float())


@pytest.mark.slow
def test_a_saved_random_init_blip_folder_attacks_through_the_same_path(
    captioner_experiment, tmp_path, capsys
):
    # a copy with one shadow and no calibration queries: two queries (random BLIP weights
    # caption slowly: every caption runs to its longest)
    runs = ("diffusion-target-000", "diffusion-shadow-001")
    keep = ("splits.json", "autoencoder", "encoder", *runs)
    layout = copy_experiment(captioner_experiment, tmp_path, keep).layout
    blip = tiny_blip_folder(tmp_path / "blip-random")
    assert (blip / "processor_config.json").is_file()  # BlipProcessor.save_pretrained's
    report = attack_main(
        [
            "--ckpt",
            str(layout.checkpoint("diffusion", 0)),
            "--query.captioner",
            str(blip),
            "--attack.attacks",
            "pixel",
            "--attack.max_epochs=5",
            "--query.num_images",
            "1",
            "--attack.calibrate=false",
            "--progress=false",
        ]
    )
    assert report.captions == "captioner" and report.captioner == {"folder": str(blip.resolve())}
    assert (layout.attack / "shadow@blip-random" / "report.json").is_file()
    assert any(f"captioner {blip}" in note for note in report.notes)  # trained elsewhere
    assert "captioner captions (blip-random)" in capsys.readouterr().out


def _card_edited(layout, tmp, name, **changes):
    """A copy of the experiment's captioner whose card says it was trained otherwise."""
    folder = tmp / name
    shutil.copytree(layout.captioner, folder, ignore=shutil.ignore_patterns("checkpoints"))
    card = json.loads((folder / "card.json").read_text())
    card.update(changes)
    (folder / "card.json").write_text(json.dumps(card))
    return folder


def _other_experiments_captioner(layout, tmp):
    """A captioner really trained (2 steps) on another experiment's pools."""
    other = tmp / "other"
    train_main(fit_args(other, CAPTIONER, "--data.seed=1", "--trainer.max_steps=2"))
    return other / "captioner"


BAD_CAPTIONERS = {
    "not a captioner (the encoder folder)": (lambda lay, t: lay.encoder, "not 'blip'"),
    "no model at all": (lambda lay, t: t, "no config.json"),
    "trained on another experiment": (_other_experiments_captioner, "not on this experiment's"),
    "trained on the target's members": (
        lambda lay, t: _card_edited(lay, t, "members", train_split="members"),
        "never a model's members",
    ),
    "captions that come out empty": (
        lambda lay, t: tiny_blip_folder(t / "mute", first_token="[SEP]"),
        "empty caption for",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_CAPTIONERS, ids=list(BAD_CAPTIONERS))
def test_bad_captioners_are_refused_in_one_line(case, finished, tmp_path, capsys):
    _, layout, _, _ = finished
    make, needle = BAD_CAPTIONERS[case]
    folder = make(layout, tmp_path)
    capsys.readouterr()
    before = sorted(p for p in layout.root.rglob("*"))
    with pytest.raises(SystemExit) as err:
        attack_main(
            [
                "--ckpt",
                str(layout.checkpoint("diffusion", 0)),
                "--query.captioner",
                str(folder),
                "--attack.attacks",
                "pixel",
                "--progress=false",
            ]
        )
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert err.value.code == 1 and "Traceback" not in out.err
    assert lines[-1].startswith("error: ") and needle in lines[-1], lines[-1]
    assert str(folder) in lines[-1]
    assert sorted(p for p in layout.root.rglob("*")) == before  # no query, no report


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--captions", "captioner"], "needs the experiment key captioner"),
        (["--captions", "ground-truth", "imagined"], "unknown mode 'imagined'"),
    ],
    ids=["captioner mode without a captioner", "unknown caption mode"],
)
def test_experiment_caption_modes_are_checked_first(extra, needle, tmp_path, capsys):
    config = experiment_config(tmp_path / "exp")  # no captioner stage
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as err:
        experiment_main([str(path), *extra])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.value.code == 1 and line.startswith("error: captions:") and needle in line, line
    assert not (tmp_path / "exp").exists()  # refused before any stage
