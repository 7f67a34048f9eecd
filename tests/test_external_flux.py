"""Audit a FluxPipeline trained elsewhere as an SD3 one (tests/test_external_sd3.py): a tiny
FLUX folder and a diffusers-format LoRA of its transformer become the flow family's target (the
adapter alone, equal to diffusers' own loading), audited end to end with one shadow fine-tuned
by the same recipe; the FLUX recipes are the default shadow configs; a full fine-tune of the
transformer (and of the CLIP; a changed T5 warns) from a base; a LoRA of the transformer and the
CLIP trains the shadows' CLIP too; a FLUX folder given where an SD3 base is expected is
refused."""

import json
import shutil

import pytest
import torch
import yaml
from diffusers import FluxPipeline, FluxTransformer2DModel
from tiny_pipeline import (
    RES,
    audit_args,
    audit_options,
    save_diffusers_lora,
    save_member_lists,
    save_tiny_clip,
    save_tiny_flux_pipeline,
    save_tiny_sd3_pipeline,
    tiny_shadow_config,
)

from lightning_mia.attack.options import ExternalTarget
from lightning_mia.card import load_checkpoint, read_card
from lightning_mia.cli import attack_main
from lightning_mia.external.audit import prepare_external, shadow_recipe, shadow_settings
from lightning_mia.models.flow import FlowMatchingModule
from lightning_mia.models.flow_arch import image_positions, pack
from lightning_mia.models.flow_presets import FLUX_LAYOUT
from lightning_mia.models.pipeline_folder import pipeline_sha256
from lightning_mia.models.registry import load_family_module
from lightning_mia.paths import ExperimentLayout

N = 16  # members and non-members each: the target is tested on half, the shadow draws the rest
TARGETS = ("to_q", "add_k_proj")  # image and text streams of the double-stream attention
SHADOW_CONFIG = tiny_shadow_config("lightning_mia.models.flow.FlowMatchingModule")
# FluxPipeline's 512 T5 tokens are the audit's default; the tiny folder's tokenizer holds 77.
# A FLUX transformer's config has no sample size: the folder's native side is the pipeline's
# default 128 latents (256 px over the tiny f2 VAE), so the tests ask for the images' 16.
SHADOW_CONFIG["model"]["init_args"].update(max_sequence_length=77, resolution=RES)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """What an auditor is handed: a FLUX folder and a diffusers LoRA of its transformer,
    images with member lists; and a CLIP folder, the shadows' config."""
    root = tmp_path_factory.mktemp("handed-flux")
    pipeline = save_tiny_flux_pipeline(root / "flux")
    members, non_members = save_member_lists(root, N)
    config = root / "shadow.yaml"
    config.write_text(yaml.safe_dump(SHADOW_CONFIG))
    return dict(
        root=root,
        pipeline=pipeline,
        lora=save_diffusers_lora(root / "lora", pipeline, rank=2, alpha=4.0, targets=TARGETS),
        members=members,
        non_members=non_members,
        clip=save_tiny_clip(root / "clip"),
        config=config,
    )


def transformer_out(transformer, seed=0):
    """The packed velocity of a FLUX transformer at fixed inputs (B=2, 8x8x4 latents)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = pack(torch.randn(2, 4, RES // 2, RES // 2, generator=g))
    text = torch.randn(2, 77, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(2, cfg.pooled_projection_dim, generator=g)
    with torch.no_grad():
        return transformer(
            hidden_states=x,
            timestep=torch.tensor([0.1, 0.7]),
            encoder_hidden_states=text,
            pooled_projections=pooled,
            txt_ids=torch.zeros(77, 3),
            img_ids=image_positions(RES // 2, RES // 2, "cpu", torch.float32),
        ).sample


def test_a_flux_lora_becomes_the_target_and_sets_the_shadows_recipe(inputs, tmp_path):
    options = audit_options(inputs, tmp_path / "exp", 0, lora=str(inputs["lora"]))
    ckpt = prepare_external(options).ckpt
    assert ckpt == str(ExperimentLayout(tmp_path / "exp").checkpoint("flow", 0))
    saved = load_checkpoint(ckpt)
    assert all(".lora_" in k for k in saved["state_dict"] if k != "samples_seen")
    hp = saved["hyper_parameters"]
    assert (hp["lora_rank"], hp["lora_alpha"], tuple(hp["lora_targets"])) == (2, 4.0, TARGETS)
    assert hp["train_transformer"] and not hp["train_text_encoder"]
    model = load_family_module(ckpt)
    assert isinstance(model, FlowMatchingModule) and model.arch.name == "flux"
    pipe = FluxPipeline.from_pretrained(str(inputs["pipeline"]), local_files_only=True)
    pipe.load_lora_weights(str(inputs["lora"]))
    torch.testing.assert_close(
        transformer_out(model.transformer), transformer_out(pipe.transformer)
    )
    shadow = shadow_settings(hp, options.external, str(inputs["pipeline"]), FLUX_LAYOUT)
    assert (shadow["lora_rank"], shadow["lora_alpha"], shadow["lora_targets"]) == (
        2,
        4.0,
        list(TARGETS),
    )
    assert shadow["train_transformer"] and not shadow["train_text_encoder"]


def test_the_default_shadow_recipes_are_the_flux_configs(inputs, monkeypatch, request):
    monkeypatch.chdir(request.config.rootpath)  # the configs/ paths are the repository's
    for lora, path in ((str(inputs["lora"]), FLUX_LAYOUT.lora_config), ("", FLUX_LAYOUT.config)):
        ext = ExternalTarget(pipeline=str(inputs["pipeline"]), lora=lora)
        config, settings = shadow_recipe(ext, FLUX_LAYOUT)
        assert config == yaml.safe_load(open(path))
        assert config["model"]["init_args"]["guidance_scale"] == 3.5  # FLUX.1-dev's
        assert ("lora_rank" in settings) == bool(lora)


def test_a_full_fine_tune_of_the_flux_transformer_from_a_base(inputs, tmp_path):
    tuned = tmp_path / "tuned"
    shutil.copytree(inputs["pipeline"], tuned)
    other = save_tiny_flux_pipeline(tmp_path / "other", seed=7)
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
    reference = FluxTransformer2DModel.from_pretrained(str(other), subfolder="transformer")
    torch.testing.assert_close(transformer_out(model.transformer), transformer_out(reference))
    shadow = shadow_settings(
        saved["hyper_parameters"], options.external, str(inputs["pipeline"]), FLUX_LAYOUT
    )
    assert shadow["pretrained"] == str(inputs["pipeline"]) and shadow["lora_rank"] == 0
    assert shadow["train_transformer"] and not shadow["train_text_encoder"]
    half = tmp_path / "bf16.yaml"  # the default recipes' frozen_dtype: bfloat16
    config = dict(SHADOW_CONFIG, model=json.loads(json.dumps(SHADOW_CONFIG["model"])))
    config["model"]["init_args"]["frozen_dtype"] = "bfloat16"
    half.write_text(yaml.safe_dump(config))
    options = audit_options(
        {**inputs, "config": half},
        tmp_path / "exp-bf16",
        0,
        pipeline=str(tuned),
        base=str(inputs["pipeline"]),
    )
    target = load_family_module(prepare_external(options).ckpt)
    # its transformer in float32, as the shadows that train theirs; the rest as theirs
    assert target.hparams.float32_parts == ("transformer",)
    assert target.transformer.dtype == torch.float32
    assert (target.text_encoder.dtype, target.text_encoder_2.dtype) == (torch.bfloat16,) * 2
    shutil.rmtree(tuned / "text_encoder_2")  # a tuned T5: never trained here
    shutil.copytree(other / "text_encoder_2", tuned / "text_encoder_2")
    with pytest.warns(UserWarning, match=r"\['text_encoder_2'\] differ from the base"):
        shadow = shadow_settings(
            saved["hyper_parameters"], options.external, options.external.base, FLUX_LAYOUT
        )
    assert not shadow["train_text_encoder"]  # the CLIP is the base's
    whole = audit_options(
        inputs, tmp_path / "exp", 0, pipeline=str(other), base=str(inputs["pipeline"])
    )
    with pytest.warns(UserWarning, match=r"\['text_encoder_2'\] differ from the base"):
        shadow = shadow_settings(
            saved["hyper_parameters"], whole.external, whole.external.base, FLUX_LAYOUT
        )
    assert shadow["train_text_encoder"]  # the CLIP changed too: the shadows train theirs


def test_a_flux_lora_of_the_transformer_and_the_clip_trains_shadows_the_same(inputs, tmp_path):
    lora = save_diffusers_lora(
        tmp_path / "both",
        inputs["pipeline"],
        parts=("transformer", "text_encoder"),
        targets=("to_q", "q_proj"),
    )
    options = audit_options(inputs, tmp_path / "exp", 0, lora=str(lora))
    ckpt = prepare_external(options).ckpt
    hp = load_checkpoint(ckpt)["hyper_parameters"]
    assert hp["train_transformer"] and hp["train_text_encoder"]
    model = load_family_module(ckpt)
    assert {n.split(".")[0] for n, _ in model.named_parameters() if ".lora_" in n} == {
        "transformer",
        "text_encoder",
    }
    shadow = shadow_settings(hp, options.external, str(inputs["pipeline"]), FLUX_LAYOUT)
    assert shadow["lora_rank"] == 2 and shadow["train_text_encoder"]
    built = FlowMatchingModule(
        **shadow, max_sequence_length=77
    )  # a shadow: adapters in the transformer and the CLIP, the T5 as the folder's
    trained = {n.split(".")[0] for n, p in built.named_parameters() if p.requires_grad}
    assert trained == {"transformer", "text_encoder"}


def test_an_sd3_base_for_a_flux_target_is_refused_writing_nothing(inputs, tmp_path, capsys):
    sd3 = save_tiny_sd3_pipeline(tmp_path / "sd3")
    exp = tmp_path / "exp"
    with pytest.raises(SystemExit) as exit_info:
        attack_main(audit_args(inputs, exp, "--external.base", str(sd3)))
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert "StableDiffusion3Pipeline" in err[-1] and "FluxPipeline" in err[-1]
    assert not exp.exists()


@pytest.mark.slow
def test_a_flux_lora_trained_elsewhere_is_audited_end_to_end(inputs, tmp_path):
    """With the folder's weights in bfloat16 for the target and the shadows, as
    configs/flow/flux-lora.yaml has them (models.precision), the shadows' adapters in float32."""
    exp = tmp_path / "audit"
    config = dict(SHADOW_CONFIG, model=json.loads(json.dumps(SHADOW_CONFIG["model"])))
    config["model"]["init_args"]["frozen_dtype"] = "bfloat16"
    (tmp_path / "shadow.yaml").write_text(yaml.safe_dump(config))
    attack_main(
        audit_args(
            {**inputs, "config": tmp_path / "shadow.yaml"},
            exp,
            "--external.lora",
            str(inputs["lora"]),
            "--query.num_images=1",
            "--attack.max_epochs=5",
            "--progress=false",
            "--query.signals",
            "flow_loss",
        )
    )
    report = json.loads((exp / "attack" / "report.json").read_text())
    assert report["target"]["external"]["pipeline_sha256"] == pipeline_sha256(inputs["pipeline"])
    assert report["test_samples"] == {"members": N // 2, "non_members": N // 2}
    shadow = torch.load(ExperimentLayout(exp).checkpoint("flow", 1), weights_only=True)
    sp = shadow["hyper_parameters"]
    assert (sp["pretrained"], sp["lora_rank"], sp["lora_alpha"]) == (str(inputs["pipeline"]), 2, 4)
    assert all(".lora_" in k for k in shadow["state_dict"] if k != "samples_seen")
    shadow_model = load_family_module(ExperimentLayout(exp).checkpoint("flow", 1))
    assert shadow_model.arch.name == "flux" and sp["frozen_dtype"] == "bfloat16"
    dtypes = {(".lora_" in n, p.dtype) for n, p in shadow_model.transformer.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
