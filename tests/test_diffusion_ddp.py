"""Latent diffusion training under DDP: 2 CPU processes (gloo, ddp_spawn), rank-0 files."""

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mia.card import read_card
from lightning_mia.data.datamodule import MembershipDataModule
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.diffusion import LatentDiffusionModule
from lightning_mia.models.registry import load_family_module


@pytest.mark.slow
def test_ddp_spawn_trains_counts_both_ranks_and_writes_one_checkpoint(
    tmp_path, trained_autoencoder
):
    dm = MembershipDataModule(
        str(tmp_path), ShapesSource(num_samples=32, resolution=16), num_shadows=1, batch_size=2
    )
    run = dm.layout.run_dir("diffusion", 0)
    torch.manual_seed(0)
    model = LatentDiffusionModule(
        autoencoder=str(trained_autoencoder), resolution=16, max_caption_length=77, lr=1e-3
    )
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    trainer = Trainer(
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=run / "checkpoints", save_last=True)],
    )
    trainer.fit(model, datamodule=dm)

    files = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in files and not [f for f in files if "tmp" in f], files
    card = read_card(run / "checkpoints" / "last.ckpt")
    assert card.family == "diffusion" and card.role == "target" and card.model_index == 0
    # 8 members; 3 steps x batch 2 x 2 ranks = 12 samples seen -> 1.5 steps per image
    assert card.train_steps_per_image == pytest.approx(3 * 2 * 2 / 8)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3  # (ddp_spawn leaves this process's trainer at step 0)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    loaded = load_family_module(run / "checkpoints" / "last.ckpt")
    changed = [k for k, v in loaded.unet.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the weights of the DDP run, not the initial ones


@pytest.mark.slow
def test_the_flow_family_trains_under_ddp_spawn(tmp_path):
    """The FLUX architecture of the flow family (the SD3 one shares the module): 2 ranks, one
    checkpoint, both ranks' samples counted; DDP's reducer raises on the second step if a
    parameter had no gradient (FLUX's guidance embedder is off in flux-tiny)."""
    from tiny_pipeline import tiny_vae

    from lightning_mia.models.flow import FlowMatchingModule
    from lightning_mia.models.vae import save_autoencoder

    torch.manual_seed(0)
    autoencoder = save_autoencoder(tiny_vae(), tmp_path / "autoencoder")
    dm = MembershipDataModule(
        str(tmp_path), ShapesSource(num_samples=32, resolution=16), num_shadows=1, batch_size=2
    )
    run = dm.layout.run_dir("flow", 0)
    model = FlowMatchingModule(
        preset="flux-tiny", autoencoder=str(autoencoder), resolution=16, max_caption_length=77
    )
    before = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    trainer = Trainer(
        accelerator="cpu",
        strategy="ddp_spawn",
        devices=2,
        max_steps=3,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=run / "checkpoints", save_last=True)],
    )
    trainer.fit(model, datamodule=dm)
    card = read_card(run / "checkpoints" / "last.ckpt")
    assert (card.family, card.role) == ("flow", "target")
    assert card.train_steps_per_image == pytest.approx(3 * 2 * 2 / 8)
    loaded = load_family_module(run / "checkpoints" / "last.ckpt")
    assert loaded.arch.name == "flux"
    after = loaded.transformer.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in before.items() if v.is_floating_point())
