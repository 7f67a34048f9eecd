"""Audit a StableDiffusion3Pipeline trained elsewhere exactly as a StableDiffusionPipeline
(tests/test_external.py): a tiny SD3 folder and a diffusers-format LoRA of its transformer,
audited end to end with one flow-family shadow; a peft adapter of the transformer and a full
fine-tune (`--external.base`) as far as the target checkpoint and the shadows' settings; the
inputs it refuses — an adapter of another model, folders of two families, a shadow config of the
other family — one line each, nothing written."""

import io
import json
import logging
import shutil

import pytest
import torch
import yaml
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from peft import PeftModel
from tiny_pipeline import (
    RES,
    audit_args,
    audit_options,
    other_transformer_lora,
    save_diffusers_lora,
    save_member_lists,
    save_peft_adapter,
    save_tiny_clip,
    save_tiny_pipeline,
    save_tiny_sd3_pipeline,
    tiny_shadow_config,
)

from lightning_mia.attack.options import ExternalTarget
from lightning_mia.card import CARD_KEY, load_checkpoint, read_card
from lightning_mia.cli import attack_main
from lightning_mia.external.audit import prepare_external, shadow_recipe, shadow_settings
from lightning_mia.models.flow import FlowMatchingModule
from lightning_mia.models.flow_presets import SD3_LAYOUT
from lightning_mia.models.pipeline_folder import pipeline_sha256
from lightning_mia.models.registry import load_family_module
from lightning_mia.paths import ExperimentLayout

N = 16  # members and non-members each: the target is tested on half, the shadow draws the rest
TARGETS = ("to_q", "add_k_proj")  # image and text streams of the MMDiT's joint attention
SHADOW_CONFIG = tiny_shadow_config("lightning_mia.models.flow.FlowMatchingModule")
SD_SHADOW_CONFIG = tiny_shadow_config("lightning_mia.models.diffusion.LatentDiffusionModule")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What an auditor is handed: an SD3 folder, a diffusers LoRA and a peft adapter of its
    transformer, images with member lists; and a CLIP folder, the shadows' config."""
    root = tmp_path_factory.mktemp("handed-sd3")
    pipeline = save_tiny_sd3_pipeline(root / "sd3")
    members, non_members = save_member_lists(root, N)
    config = root / "shadow.yaml"
    config.write_text(yaml.safe_dump(SHADOW_CONFIG))
    return dict(
        root=root,
        pipeline=pipeline,
        lora=save_diffusers_lora(root / "lora", pipeline, rank=2, alpha=4.0, targets=TARGETS),
        peft=save_peft_adapter(root / "peft", pipeline, rank=4, alpha=2.0, part="transformer"),
        members=members,
        non_members=non_members,
        clip=save_tiny_clip(root / "clip"),
        config=config,
    )


def transformer_out(transformer, seed=0):
    """The velocity of an SD3 transformer at fixed inputs (B=2, 8x8x4 latents)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(2, 4, RES // 2, RES // 2, generator=g)
    text = torch.randn(2, 77, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(
            hidden_states=x,
            timestep=torch.tensor([100.0, 700.0]),
            encoder_hidden_states=text,
            pooled_projections=pooled,
        ).sample


@pytest.mark.slow
def test_an_sd3_lora_trained_elsewhere_is_audited_end_to_end(inputs, tmp_path):
    exp = tmp_path / "audit"
    attack_main(
        audit_args(
            inputs,
            exp,
            "--external.lora",
            str(inputs["lora"]),  # the .safetensors file itself
            "--query.num_images=1",
            "--attack.max_epochs=5",
            "--progress=false",
            "--query.signals",
            "flow_loss",
        )
    )
    report = json.loads((exp / "attack" / "report.json").read_text())
    external = report["target"]["external"]
    assert external["pipeline_sha256"] == pipeline_sha256(inputs["pipeline"])
    assert report["test_samples"] == {"members": N // 2, "non_members": N // 2}
    assert "external target: pipeline" in " ".join(report["notes"])

    # the target: row 0 of the flow family, the adapter alone, = diffusers' own loading
    layout = ExperimentLayout(exp)
    target = torch.load(layout.checkpoint("flow", 0), weights_only=True)
    assert all(".lora_" in k for k in target["state_dict"] if k != "samples_seen")
    hp = target["hyper_parameters"]
    assert (hp["lora_rank"], hp["lora_alpha"], tuple(hp["lora_targets"])) == (2, 4.0, TARGETS)
    assert hp["train_transformer"] and not hp["train_text_encoder"]
    model = load_family_module(layout.checkpoint("flow", 0))
    assert isinstance(model, FlowMatchingModule)
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(inputs["pipeline"]), text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    pipe.load_lora_weights(str(inputs["lora"]))
    torch.testing.assert_close(
        transformer_out(model.transformer), transformer_out(pipe.transformer)
    )
    assert model.noise_scheduler.config.shift == 3.0  # the folder's

    # the shadow: a flow LoRA of the same rank, alpha and layers from the same base
    shadow = torch.load(layout.checkpoint("flow", 1), weights_only=True)
    sp = shadow["hyper_parameters"]
    assert (sp["pretrained"], sp["lora_rank"], sp["lora_alpha"]) == (str(inputs["pipeline"]), 2, 4)
    assert tuple(sp["lora_targets"]) == TARGETS and not sp["train_text_encoder"]
    assert all(".lora_" in k for k in shadow["state_dict"] if k != "samples_seen")
    assert shadow[CARD_KEY]["base"]["sha256"] == external["pipeline_sha256"]


def test_a_peft_adapter_of_the_sd3_transformer_becomes_the_target(inputs, tmp_path):
    options = audit_options(inputs, tmp_path / "exp", 0, lora=str(inputs["peft"]))
    ckpt = prepare_external(options).ckpt
    assert ckpt == str(ExperimentLayout(tmp_path / "exp").checkpoint("flow", 0))
    hp = load_checkpoint(ckpt)["hyper_parameters"]
    assert (hp["lora_rank"], hp["lora_alpha"], tuple(hp["lora_targets"])) == (
        4,
        2.0,
        ("to_q", "to_v"),
    )
    model = load_family_module(ckpt)
    base = SD3Transformer2DModel.from_pretrained(str(inputs["pipeline"]), subfolder="transformer")
    reference = PeftModel.from_pretrained(base, str(inputs["peft"]))
    torch.testing.assert_close(transformer_out(model.transformer), transformer_out(reference))
    shadow = shadow_settings(hp, options.external, str(inputs["pipeline"]), SD3_LAYOUT)
    assert (shadow["lora_rank"], shadow["lora_alpha"], shadow["lora_targets"]) == (
        4,
        2.0,
        ["to_q", "to_v"],
    )
    assert shadow["train_transformer"] and not shadow["train_text_encoder"]


def test_a_full_fine_tune_of_the_transformer_from_a_base(inputs, tmp_path):
    """Only the transformer changed: the shadows train it, and not the text encoders."""
    tuned = tmp_path / "tuned"
    shutil.copytree(inputs["pipeline"], tuned)
    other = save_tiny_sd3_pipeline(tmp_path / "other", seed=7)
    shutil.rmtree(tuned / "transformer")
    shutil.copytree(other / "transformer", tuned / "transformer")
    options = audit_options(
        inputs, tmp_path / "exp", 0, pipeline=str(tuned), base=str(inputs["pipeline"])
    )
    ckpt = prepare_external(options).ckpt
    assert read_card(ckpt).external["base"] == str(inputs["pipeline"])
    saved = load_checkpoint(ckpt)
    assert list(saved["state_dict"]) == ["samples_seen"]  # every weight is the folder's
    model = load_family_module(ckpt)
    reference = SD3Transformer2DModel.from_pretrained(str(other), subfolder="transformer")
    torch.testing.assert_close(transformer_out(model.transformer), transformer_out(reference))
    shadow = shadow_settings(
        saved["hyper_parameters"], options.external, str(inputs["pipeline"]), SD3_LAYOUT
    )
    assert shadow["pretrained"] == str(inputs["pipeline"]) and shadow["lora_rank"] == 0
    assert shadow["train_transformer"] and not shadow["train_text_encoder"]
    (tuned / "text_encoder_3").mkdir()  # a T5 encoder the base has not: never trained here
    (tuned / "text_encoder_3" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"\['text_encoder_3'\] differ from the base"):
        shadow_settings(
            saved["hyper_parameters"], options.external, options.external.base, SD3_LAYOUT
        )
    whole = audit_options(
        inputs, tmp_path / "exp", 0, pipeline=str(other), base=str(inputs["pipeline"])
    )
    assert shadow_settings(
        saved["hyper_parameters"], whole.external, whole.external.base, SD3_LAYOUT
    )["train_text_encoder"]  # both CLIP encoders changed too


def test_the_default_shadow_recipe_is_the_flow_family_s(inputs, monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)  # the configs/ paths are the repository's
    for lora, path in ((str(inputs["lora"]), SD3_LAYOUT.lora_config), ("", SD3_LAYOUT.config)):
        ext = ExternalTarget(pipeline=str(inputs["pipeline"]), lora=lora)
        config, settings = shadow_recipe(ext, SD3_LAYOUT)
        assert config == yaml.safe_load(open(path))
        assert config["model"]["class_path"] == "lightning_mia.models.flow.FlowMatchingModule"
        assert ("lora_rank" in settings) == bool(lora)


@pytest.fixture
def diffusers_log():
    """What diffusers logs (its own handlers print to the stderr of the time it was imported,
    out of capsys' reach): a handler of ours beside them."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)  # info lines depend on another test's verbosity
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield stream
    logger.removeHandler(handler)


def test_bad_sd3_inputs_give_one_clear_line_and_write_nothing(
    inputs, tmp_path, capsys, diffusers_log
):
    exp = tmp_path / "exp"

    def fails(extra, needle, **paths):
        capsys.readouterr()  # what building the inputs printed
        diffusers_log.seek(0)
        diffusers_log.truncate()  # and logged
        with pytest.raises(SystemExit) as err:
            attack_main(audit_args({**inputs, **paths}, exp, *extra))
        assert err.value.code == 1
        message = capsys.readouterr().err.strip()
        assert needle in message and "Traceback" not in message, message
        assert len(message.splitlines()) == 1 and not diffusers_log.getvalue(), message
        assert not exp.exists(), sorted(exp.rglob("*"))

    sd = save_tiny_pipeline(tmp_path / "sd")
    other = other_transformer_lora(tmp_path / "other-lora")
    fails(["--external.lora", str(other)], "diffusers cannot load it")
    sd_lora = save_diffusers_lora(tmp_path / "sd-lora", sd, parts=("unet",))
    fails(["--external.lora", str(sd_lora)], "no weight of it fits this StableDiffusion3Pipeline")
    sd_peft = save_peft_adapter(tmp_path / "sd-peft", sd)  # to_q, to_v: names SD3 has too
    fails(["--external.lora", str(sd_peft)], "fit no SD3Transformer2DModel layer")
    one_clip = save_diffusers_lora(
        tmp_path / "one-clip", inputs["pipeline"], parts=("text_encoder",), targets=("q_proj",)
    )
    fails(["--external.lora", str(one_clip)], "adapts ['text_encoder'] but not ['text_encoder_2']")
    fails(["--external.base", str(sd)], f"--external.base {sd} holds a StableDiffusionPipeline")
    fails(
        ["--external.base", str(inputs["pipeline"])],
        "holds a StableDiffusion3Pipeline, --external.pipeline",
        pipeline=sd,
    )
    sd_config = tmp_path / "sd-shadow.yaml"
    sd_config.write_text(yaml.safe_dump(SD_SHADOW_CONFIG))
    fails(
        ["--external.lora", str(inputs["lora"])],
        "its model is lightning_mia.models.diffusion.LatentDiffusionModule, not a "
        "lightning_mia.models.flow.FlowMatchingModule",
        config=sd_config,
    )
