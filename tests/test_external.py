"""Audit a model trained elsewhere, end to end: a tiny StableDiffusionPipeline folder and a
LoRA adapter saved by peft, member lists (jsonl and csv) of image files, one shadow trained by
the audit, the attacks and the report; then the full-fine-tune path over ids of a `--data`
source; and the inputs it refuses, one clear line each."""

import json

import pytest
import torch
import yaml
from diffusers import UNet2DConditionModel
from peft import PeftModel
from tiny_pipeline import (
    RES,
    audit_args,
    audit_options,
    save_member_lists,
    save_peft_adapter,
    save_tiny_clip,
    save_tiny_pipeline,
    tiny_shadow_config,
    write_member_list,
)

from lightning_mia.card import CARD_KEY, read_card
from lightning_mia.cli import attack_main
from lightning_mia.external.audit import prepare_external
from lightning_mia.models.pipeline_folder import pipeline_sha256
from lightning_mia.models.registry import load_family_module
from lightning_mia.paths import ExperimentLayout

N = 24  # members and non-members each: the target is tested on half, the shadows draw the rest
SHADOW_CONFIG = tiny_shadow_config("lightning_mia.models.diffusion.LatentDiffusionModule")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What an auditor is handed (built in code): a pipeline, a peft adapter of its UNet, a
    folder of images with a jsonl of members and a csv of non-members; and a CLIP folder."""
    root = tmp_path_factory.mktemp("handed")
    pipeline = save_tiny_pipeline(root / "sd", prediction_type="v_prediction")
    lora = save_peft_adapter(root / "lora", pipeline, rank=2, alpha=4.0)
    members, non_members = save_member_lists(root, N)
    config = root / "shadow.yaml"
    config.write_text(yaml.safe_dump(SHADOW_CONFIG))
    return dict(
        root=root,
        pipeline=pipeline,
        lora=lora,
        members=members,
        non_members=non_members,
        clip=save_tiny_clip(root / "clip"),
        config=config,
    )


def unet_out(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, RES // 2, RES // 2, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([30, 800]), encoder_hidden_states=ctx).sample


@pytest.mark.slow
def test_a_lora_target_trained_elsewhere_is_audited_end_to_end(inputs, tmp_path, capsys):
    exp = tmp_path / "audit"
    attack_main(
        audit_args(
            inputs,
            exp,
            "--external.lora",
            str(inputs["lora"]),
            "--query.num_images=1",
            "--attack.max_epochs=5",
            "--progress=false",
            "--attack.attacks",
            "all",
            "--query.signals",
            "loss",
        )
    )
    assert "blind (diagnostic)" in capsys.readouterr().out
    report = json.loads((exp / "attack" / "report.json").read_text())
    external = report["target"]["external"]
    assert external["pipeline_sha256"] == pipeline_sha256(inputs["pipeline"])
    assert external["lora"] == str(inputs["lora"]) and len(external["lora_sha256"]) == 64
    assert report["target"]["train_steps_per_image"] is None  # not known for a model from elsewhere
    notes = " ".join(report["notes"])
    assert "external target: pipeline" in notes and "LoRA adapter" in notes
    assert f"base model {inputs['pipeline']}" in notes and f"CLIP encoder {inputs['clip']}" in notes
    assert {"pixel", "semantic", "text", "combined", "loss-mlp"} <= set(report["attacks"])
    assert report["test_samples"] == {"members": N // 2, "non_members": N // 2}

    layout = ExperimentLayout(exp)
    splits = json.loads(layout.splits.read_text())
    assert [len(splits["rows"][0][k]) for k in ("members", "nonmembers")] == [N // 2, N // 2]
    assert len(splits["aux_pool"]) == N and set(splits["aux_pool"]).isdisjoint(
        splits["target_pool"]
    )
    assert [len(splits["rows"][1][k]) for k in ("members", "nonmembers")] == [N // 2, N // 2]

    # the target checkpoint: the adapter alone, and the same model as peft's own loading
    target = torch.load(layout.checkpoint("diffusion", 0), weights_only=True)
    assert all(".lora_" in k for k in target["state_dict"] if k != "samples_seen")
    hp = target["hyper_parameters"]
    assert (hp["lora_rank"], hp["lora_alpha"]) == (2, 4.0)  # the adapter's, read from its config
    assert tuple(hp["lora_targets"]) == ("to_q", "to_v")
    model = load_family_module(layout.checkpoint("diffusion", 0))
    base = UNet2DConditionModel.from_pretrained(str(inputs["pipeline"]), subfolder="unet")
    reference = PeftModel.from_pretrained(base, str(inputs["lora"]))
    torch.testing.assert_close(unet_out(model.unet), unet_out(reference))
    assert model.noise_scheduler.config.prediction_type == "v_prediction"  # the folder's

    # the shadow: fine-tuned from the same base with the same LoRA, checkpointing only that
    shadow = torch.load(layout.checkpoint("diffusion", 1), weights_only=True)
    sp = shadow["hyper_parameters"]
    assert (sp["pretrained"], sp["lora_rank"], sp["lora_alpha"]) == (str(inputs["pipeline"]), 2, 4)
    assert tuple(sp["lora_targets"]) == ("to_q", "to_v") and not sp["train_text_encoder"]
    assert all(".lora_" in k for k in shadow["state_dict"] if k != "samples_seen")
    assert shadow[CARD_KEY]["base"]["sha256"] == external["pipeline_sha256"]
    assert (exp / "external" / "shadow.yaml").is_file()

    # a second command reuses splits, target and shadow
    stamp = layout.checkpoint("diffusion", 1).stat().st_mtime_ns
    options = audit_options(inputs, exp, lora=str(inputs["lora"]))
    again = prepare_external(options)
    assert again.ckpt == str(layout.checkpoint("diffusion", 0))
    assert layout.checkpoint("diffusion", 1).stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_full_fine_tune_over_ids_of_a_data_source(inputs, tmp_path):
    """The target is another pipeline fine-tuned in full from `--base`; the lists are ids of
    an image folder given with --data, whose other samples are the shadows' data."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [
        {
            "file_name": str(inputs["root"] / "images" / f"{i:03d}.png"),
            "text": f"shape {i}",
            "sample_id": 100 + i,
        }
        for i in range(2 * N)
    ]
    write_member_list(folder / "metadata.jsonl", rows)
    data = tmp_path / "data.yaml"
    data.write_text(
        yaml.safe_dump(
            {
                "class_path": "lightning_mia.data.ImageFolderSource",
                "init_args": {"root": str(folder), "resolution": RES},
            }
        )
    )
    members = write_member_list(tmp_path / "members.txt", [])
    members.write_text("".join(f"{100 + i}\n" for i in range(8)))
    non = write_member_list(tmp_path / "non.csv", [{"id": 108 + i} for i in range(8)])
    tuned = save_tiny_pipeline(tmp_path / "tuned", seed=7)
    options = audit_options(
        inputs,
        tmp_path / "exp",
        pipeline=str(tuned),
        base=str(inputs["pipeline"]),
        members=str(members),
        non_members=str(non),
        data=str(data),
        num_shadows=0,
    )
    ckpt = prepare_external(options).ckpt
    card = read_card(ckpt)
    assert card.external["base"] == str(inputs["pipeline"])
    saved = torch.load(ckpt, weights_only=True)
    assert list(saved["state_dict"]) == ["samples_seen"]  # every weight is the folder's
    model = load_family_module(ckpt)
    unet = UNet2DConditionModel.from_pretrained(str(tuned), subfolder="unet")
    torch.testing.assert_close(unet_out(model.unet), unet_out(unet))
    splits = json.loads(ExperimentLayout(tmp_path / "exp").splits.read_text())
    assert splits["rows"][0] == {"members": [*range(100, 108)], "nonmembers": [*range(108, 116)]}
    assert splits["aux_pool"] == list(range(116, 100 + 2 * N))  # the rest of the source


def test_bad_external_inputs_give_one_clear_line_each(inputs, tmp_path, capsys):
    def fails(extra, needle, **paths):
        args = audit_args({**inputs, **paths}, tmp_path / "exp", *extra)
        with pytest.raises(SystemExit) as err:
            attack_main(args)
        assert err.value.code == 1
        message = capsys.readouterr().err
        assert needle in message and "Traceback" not in message, message
        return message

    lora = ["--external.lora", str(inputs["lora"])]
    rows = [json.loads(line) for line in inputs["members"].read_text().splitlines()]
    missing = write_member_list(
        inputs["root"] / "missing.jsonl",
        [*rows[:3], {"file_name": "images/nope.png", "text": "a cat"}],
    )
    fails(lora, "images/nope.png (", members=missing)
    fails(
        lora,
        "captionless.csv line 3 (images/001.png): no caption",
        members=write_member_list(
            inputs["root"] / "captionless.csv", [rows[0], {"file_name": rows[1]["file_name"]}]
        ),
    )
    other = save_tiny_pipeline(tmp_path / "xl")
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "KandinskyPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    fails(lora, "holds a KandinskyPipeline", pipeline=other)
    fails([], "a fully fine-tuned --external.pipeline needs --external.base")
    fails([*lora, "--external.base", str(other)], "with --external.lora the pipeline is the base")
    fails(["--external.lora", str(tmp_path)], "not a .safetensors file")
    with pytest.raises(SystemExit):
        attack_main(["--external.pipeline", str(inputs["pipeline"]), *lora])
    assert "--external.members is needed" in capsys.readouterr().err


def test_cautions_name_only_the_components_trained_elsewhere(tmp_path):
    from lightning_mia.attack.cautions import pretrained_components
    from lightning_mia.card import RunCard
    from lightning_mia.paths import atomic_write_json, done_marker

    layout = ExperimentLayout(tmp_path / "exp")
    for stage in (layout.autoencoder, layout.encoder):  # trained here: DONE markers
        atomic_write_json(done_marker(stage), {})
    own = str(layout.autoencoder)
    card = RunCard("diffusion", "tiny", 0, "h", str(layout.root), autoencoder=own)
    assert pretrained_components(card, layout, encoder=str(layout.encoder)) == []
    # DALL-E mini's VQGAN converted into the experiment (no stage trained it), a real CLIP, BLIP
    imported = RunCard(
        "seq2seq",
        "dalle-mini",
        0,
        "h",
        str(layout.root),
        autoencoder=str(layout.root / "vqgan"),
        text_init="/models/bart-large",
    )
    found = pretrained_components(imported, layout, "/models/clip", "/models/blip")
    assert found == [
        f"VQGAN image tokenizer {layout.root / 'vqgan'}",
        "pretrained BART text side /models/bart-large",
        "CLIP encoder /models/clip (semantic and text attacks)",
        "captioner /models/blip",
    ]
