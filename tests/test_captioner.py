"""The attacker's captioner: trained here on its own pool it writes a BLIP folder that `Captioner`
loads like a pretrained one; quality scores are right on fixed inputs; bad input fails clearly."""

import json

import pytest
import torch
from tiny_blip import tiny_blip_folder
from tiny_experiment import CAPTIONER_STEPS, NUM_SAMPLES, RESOLUTION, captioner_args

from lightning_mia.cli import train_main
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.data.splits import load_splits
from lightning_mia.features.caption_quality import (
    CaptionQuality,
    ShapeMention,
    parse_shapes_caption,
)
from lightning_mia.models.captioner import Captioner, CaptionerError, check_captioner_card
from lightning_mia.models.captioner_train import held_out_mask

SOURCE = ShapesSource(num_samples=NUM_SAMPLES, resolution=RESOLUTION)  # the experiment's


@pytest.fixture(scope="module")
def trained(captioner_experiment):
    """configs/captioner/tiny.yaml through the command line, CAPTIONER_STEPS steps at batch 32
    on the session experiment's 256-sample public pool (tests/tiny_experiment.py)."""
    exp = captioner_experiment.root
    args = [a for a in captioner_args(exp) if not a.startswith("--trainer.max_steps")]
    metrics = captioner_experiment.metrics
    return {"exp": exp, "folder": exp / "captioner", "metrics": metrics, "args": args}


def test_trained_captioner_folder_loads_and_captions(trained):
    folder, exp = trained["folder"], trained["exp"]
    splits = load_splits(exp / "splits.json")
    card = check_captioner_card(folder, splits.hash)  # trained on this experiment: accepted
    assert card.family == "captioner" and card.train_split == "public"
    assert card.experiment == str(exp) and card.train_steps == CAPTIONER_STEPS
    for name in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"):
        assert (folder / name).is_file(), name
    source = SOURCE
    images = torch.stack([source.image(i) for i in splits.target_pool[:8]])  # (8, 3, 32, 32)
    captions = Captioner(str(folder)).caption(images)
    assert len(captions) == 8 and all(isinstance(c, str) and c.strip() for c in captions)
    words = {w for i in splits.public_pool for w in source.caption(i).replace(",", " ").split()}
    assert all(set(c.replace(",", " ").split()) <= words for c in captions)  # training words
    with pytest.raises(CaptionerError, match="not on this experiment's pools"):
        check_captioner_card(folder, "0" * 64)


def test_held_out_quality_is_logged_and_recorded(trained):
    """The logged and recorded quality is that of the folder's captions of the held-out ids."""
    folder, exp = trained["folder"], trained["exp"]
    splits = load_splits(exp / "splits.json")
    pool = torch.tensor(list(splits.public_pool))
    held = pool[held_out_mask(pool, 0.1, 0)].tolist()  # the config's fraction and seed
    assert 10 <= len(held) <= 45  # ~10% of 256
    source = SOURCE
    images = torch.stack([source.image(i) for i in sorted(held)])
    quality = CaptionQuality()
    quality.update(Captioner(str(folder)).caption(images), [source.caption(i) for i in held])
    expected = {k: float(v) for k, v in quality.compute().items()}
    recorded = json.loads((folder / "card.json").read_text())["quality"]
    assert recorded["num_captions"] == len(held)
    for name in ("bleu", "shapes_parsed", "count", "colours", "shapes_colours", "exact"):
        assert recorded[name] == pytest.approx(expected[name], abs=1e-6), name
        assert trained["metrics"][f"val/{name}"] == pytest.approx(expected[name], abs=1e-6)
    assert expected["shapes_parsed"] > 0.5  # it learnt the grammar (random weights parse none)


def test_captioner_refuses_a_models_members(trained, capsys):
    args = [a for a in trained["args"] if not a.startswith("--data.experiment")]
    exp = trained["exp"].parent / "members"
    with pytest.raises(SystemExit) as err:
        train_main([*args, f"--data.experiment={exp}", "--data.train_split=members"])
    assert err.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "attacker's own pool only" in line and "'members'" in line
    assert not exp.exists()  # refused before splits.json or a stage folder is written


def test_shapes_caption_parser():
    text = "a big red circle at the top left , a small blue star in the center and a big white ring at the bottom"  # noqa: E501
    assert parse_shapes_caption(text) == (
        ShapeMention("big", "red", "circle", "at the top left"),
        ShapeMention("big", "white", "ring", "at the bottom"),
        ShapeMention("small", "blue", "star", "in the center"),
    )
    assert parse_shapes_caption("A Small green cross on the right") == (
        ShapeMention("small", "green", "cross", "on the right"),
    )
    for bad in ("", "a dog on a couch", "a big red circle", "a huge red circle at the top"):
        assert parse_shapes_caption(bad) is None, bad


def test_caption_quality_on_fixed_captions():
    truth = [
        "a big red circle at the top left",
        "a big red circle at the top left and a small blue star in the center",
        "a small green cross on the right",
        "a small green cross on the right",
    ]
    preds = [
        "a big red circle at the top right",  # colour and shape right, place wrong
        "a small blue star in the center and a big red circle at the top left",  # all, reordered
        "a small green square on the right",  # shape wrong
        "a green cross",  # not the grammar
    ]
    quality = CaptionQuality()
    quality.update(preds[:2], truth[:2])  # two batches: states add up
    quality.update(preds[2:], truth[2:])
    got = quality.compute()
    assert float(got["shapes_parsed"]) == 0.75
    assert float(got["shapes_colours"]) == 0.5
    assert float(got["exact"]) == 0.25
    assert float(got["count"]) == 0.75 and float(got["colours"]) == 0.75
    one = CaptionQuality()
    one.update(preds[:1], truth[:1])  # n-gram precisions 7/8, 6/7, 5/6, 4/5, same length
    assert float(one.compute()["bleu"]) == pytest.approx((7 / 8 * 6 / 7 * 5 / 6 * 4 / 5) ** 0.25)
    other = CaptionQuality()  # not shapes captions: BLEU alone, case-insensitive
    other.update(["A dog on a red couch"], ["a dog on a red couch"])
    assert {k: float(v) for k, v in other.compute().items()} == {"bleu": 1.0}


def test_pretrained_blip_folder_captions_batches(tmp_path, one_thread):
    folder = tiny_blip_folder(tmp_path / "blip")
    assert check_captioner_card(folder, "any hash") is None  # no card: a pretrained folder
    captioner = Captioner(str(folder), max_new_tokens=6)
    assert (folder / "processor_config.json").is_file()  # what BlipProcessor writes
    assert captioner.image_size == 32 and captioner.mean.flatten().tolist() == [0.5] * 3
    images = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    captions = captioner.caption(images)
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert len(set(captions)) > 1  # image-dependent
    assert all("[CLS]" not in c and "[PAD]" not in c for c in captions)
    assert captioner.caption(images) == captions  # greedy: deterministic
    assert [captioner.caption(images[i : i + 1])[0] for i in range(3)] == captions
    prompted = Captioner(str(folder), max_new_tokens=4, prompt="a picture of").caption(images[:1])
    assert prompted[0].startswith("a picture of") and len(prompted[0]) > len("a picture of")


def test_empty_captions_are_refused(tmp_path, one_thread):
    folder = tiny_blip_folder(tmp_path / "mute", first_token="[SEP]")
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(CaptionerError, match=r"empty caption for 2 of 2 images"):
        Captioner(str(folder)).caption(images)


def test_folders_that_are_not_captioners(tmp_path):
    def folder(name, config=None, text=None):
        path = tmp_path / name
        path.mkdir()
        if config is not None or text is not None:
            (path / "config.json").write_text(text if text is not None else json.dumps(config))
        return str(path)

    cases = {
        folder("empty"): "no config.json",
        folder("clip", {"model_type": "clip"}): "model_type is 'clip', not 'blip'",
        folder("broken", text="{not json"): "config.json is not JSON",
        folder("vqa", {"model_type": "blip", "architectures": ["BlipForQuestionAnswering"]}): (
            "not a BlipForConditionalGeneration"
        ),
        folder("weightless", {"model_type": "blip"}): "cannot load BLIP",
    }
    for path, message in cases.items():
        with pytest.raises(CaptionerError, match=message) as err:
            Captioner(path)
        assert path in str(err.value) and "\n" not in str(err.value)


def test_cards_of_other_pools_are_refused(tmp_path):
    card = {
        "family": "captioner",
        "preset": "tiny",
        "model_index": 0,
        "splits_hash": "abc",
        "experiment": "runs/x",
        "train_split": "members",
    }
    (tmp_path / "card.json").write_text(json.dumps(card))
    with pytest.raises(CaptionerError, match="never a model's members"):
        check_captioner_card(tmp_path, "abc")
    (tmp_path / "card.json").write_text(json.dumps({**card, "family": "encoder"}))
    with pytest.raises(CaptionerError, match="not a captioner's"):
        check_captioner_card(tmp_path, "abc")
