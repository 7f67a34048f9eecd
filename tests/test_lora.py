"""LoRA fine-tuning of the diffusion family: only the adapters train, a checkpoint holds only
them plus the base folder's sha256, it reloads to the same model, refuses a changed base, and
the diffusers-format export loads into a plain StableDiffusionPipeline."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from tiny_pipeline import RES, save_tiny_pipeline

from lightning_mia.card import CARD_KEY, CheckpointError
from lightning_mia.data.datamodule import MembershipDataModule
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.diffusion import LatentDiffusionModule
from lightning_mia.models.lora import LORA_WEIGHTS, LoraError, export_lora, main
from lightning_mia.models.pipeline_folder import pipeline_sha256
from lightning_mia.models.registry import load_family_module

CAPTIONS = ["a red circle", "two blue squares on green"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def lora_model(folder, **kwargs) -> LatentDiffusionModule:
    args = dict(
        preset="pretrained",
        pretrained=str(folder),
        autoencoder="",
        resolution=0,
        lora_rank=4,
        lora_alpha=8.0,
        num_inference_steps=3,
        lr=1e-2,
    )
    return LatentDiffusionModule(**{**args, **kwargs})


def fit(model, root, steps=4):
    dm = MembershipDataModule(
        str(root), ShapesSource(num_samples=16, resolution=RES), num_shadows=1, batch_size=4
    )
    run = dm.layout.run_dir("diffusion", 0)
    callback = ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, save_top_k=0)
    seed_everything(0)
    Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        default_root_dir=run,
    ).fit(model, datamodule=dm)
    return run / "checkpoints" / "last.ckpt"


def unet_out(unet, text, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, RES // 2, RES // 2, generator=g)
    ids = torch.randint(0, 500, (2, 77), generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([50, 600]), encoder_hidden_states=text(ids)[0]).sample


def test_lora_trains_only_adapters_and_checkpoints_only_them(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "base")
    model = lora_model(folder, train_text_encoder=True)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" not in n}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)  # UNet and text-encoder adapters
    assert {n.split(".")[0] for n in trained} == {"unet", "text_encoder"}
    before = unet_out(model.unet, model.text_encoder)

    last = fit(model, tmp_path / "exp")
    after = dict(model.named_parameters())
    for key, value in base.items():  # the base stayed frozen
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    assert not torch.allclose(unet_out(model.unet, model.text_encoder), before)  # adapters moved

    saved = torch.load(last, weights_only=True)
    keys = set(saved["state_dict"])
    adapters = {n for n, _ in model.named_parameters() if ".lora_" in n}
    assert keys == adapters | {"samples_seen"}  # no base weight, no autoencoder
    assert saved[CARD_KEY]["base"] == {
        "path": str(folder),
        "sha256": pipeline_sha256(folder),
    }
    loaded = load_family_module(last)
    model.eval()
    torch.testing.assert_close(
        unet_out(loaded.unet, loaded.text_encoder), unet_out(model.unet, model.text_encoder)
    )
    images = model.generate(CAPTIONS, 1, seed=2)
    torch.testing.assert_close(loaded.generate(CAPTIONS, 1, seed=2), images)

    # the base folder's files change: the checkpoint no longer describes that model
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights)
    with pytest.raises(CheckpointError, match="its files changed"):
        load_family_module(last)


def test_export_loads_into_a_plain_stable_diffusion_pipeline(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "base")
    model = lora_model(folder, train_text_encoder=True)
    last = fit(model, tmp_path / "exp", steps=3)
    main([str(last), str(tmp_path / "out")])  # python -m lightning_mia.models.lora ckpt out
    out = tmp_path / "out"
    assert (out / LORA_WEIGHTS).is_file()
    assert json.loads((out / "base.json").read_text())["base"]["path"] == str(folder)

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    plain = unet_out(pipe.unet, pipe.text_encoder)
    pipe.load_lora_weights(str(out))
    model.eval()
    ours = unet_out(model.unet, model.text_encoder)
    assert not torch.allclose(ours, plain)
    torch.testing.assert_close(unet_out(pipe.unet, pipe.text_encoder), ours)  # alpha 8 = scale 2


def test_lora_on_the_tiny_preset_keeps_its_random_base_in_the_checkpoint(trained_autoencoder):
    model = LatentDiffusionModule(
        autoencoder=str(trained_autoencoder), resolution=16, max_caption_length=77, lora_rank=2
    )
    state = model.state_dict()
    assert any(".lora_" in k for k in state) and any(
        k.startswith("unet.") and ".lora_" not in k for k in state
    )
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    optimizer = model.configure_optimizers()["optimizer"]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trained)


def test_bad_lora_settings_give_one_clear_error(tmp_path, trained_autoencoder):
    folder = save_tiny_pipeline(tmp_path / "base")
    with pytest.raises(LoraError, match="ema_decay > 0 with lora_rank"):
        lora_model(folder, ema_decay=0.99)
    with pytest.raises(LoraError, match=r"lora_targets \['nothing_here'\] match no layer"):
        lora_model(folder, lora_targets=("nothing_here",))
    with pytest.raises(LoraError, match="exported as its adapter"):
        lora_model(folder).save_pipeline(tmp_path / "pipe")
    plain = LatentDiffusionModule(autoencoder=str(trained_autoencoder), resolution=16)
    with pytest.raises(LoraError, match="no LoRA adapter to export"):
        export_lora(plain, tmp_path / "none")
