"""Image autoencoder stage: short trainings reconstruct held-out images, folders round-trip,
bad folders and sizes fail with one clear error.

The KL autoencoder is the session fixture `trained_autoencoder` (conftest.py), shared with the
diffusion tests; the VQ one is trained here (f2, 200 steps, ~4 s on one core).
"""

import json

import pytest
import torch
from diffusers import AutoencoderKL, VQModel
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader

from lightning_mia.data.datamodule import collate_samples
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.autoencoder import AutoencoderModule
from lightning_mia.models.vae import (
    AutoencoderError,
    check_resolution,
    decode_latents,
    encode_latents,
    load_autoencoder,
    save_autoencoder,
)

RES = 16
SOURCE = ShapesSource(num_samples=256, resolution=RES, seed=0)  # the fixture's data
HELD_OUT = torch.stack([SOURCE.image(i) for i in range(192, 256)])  # (64, 3, 16, 16)
MEAN_IMAGE_MSE = (HELD_OUT - HELD_OUT.mean(0)).pow(2).mean().item()  # the blur baseline


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@torch.no_grad()
def held_out_mse(ae) -> float:
    return (decode_latents(ae, encode_latents(ae, HELD_OUT)) - HELD_OUT).pow(2).mean().item()


def test_kl_training_reconstructs_held_out_images(trained_autoencoder):
    before = load_autoencoder(trained_autoencoder.parent / "untrained")
    after = load_autoencoder(trained_autoencoder)
    assert isinstance(after, AutoencoderKL)
    mse_before, mse_after = held_out_mse(before), held_out_mse(after)
    assert mse_after < 0.3 * mse_before, (mse_before, mse_after)
    assert mse_after < 0.8 * MEAN_IMAGE_MSE, (mse_after, MEAN_IMAGE_MSE)  # not just a blur
    with torch.no_grad():
        latents = encode_latents(after, HELD_OUT)  # (64, 4, 4, 4), scaled
    assert latents.shape == (64, 4, 4, 4)
    assert 0.5 < latents.std().item() < 2.0  # the measured scaling factor makes them ~unit


@pytest.mark.slow
def test_vq_training_reconstructs_held_out_images(tmp_path):
    items = [
        {"pixel_values": SOURCE.image(i), "caption": SOURCE.caption(i), "sample_id": i}
        for i in range(192)
    ]
    seed_everything(0)
    module = AutoencoderModule(
        resolution=RES,
        block_out_channels=(8, 16),  # f2: 8x8 codes of 64
        latent_channels=4,
        vq_embed_dim=4,
        num_vq_embeddings=64,
        norm_num_groups=8,
        lr=3e-3,
        restart_dead_codes_every=20,
        output=str(tmp_path / "vq"),
    )
    module.ae.register_to_config(scaling_factor=1.0)
    mse_before = held_out_mse(module.ae)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=200,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(items, 16, shuffle=True, collate_fn=collate_samples))
    after = load_autoencoder(tmp_path / "vq")  # written by on_fit_end
    assert isinstance(after, VQModel)
    mse_after = held_out_mse(after)
    assert mse_after < 0.3 * mse_before, (mse_before, mse_after)
    assert mse_after < 0.8 * MEAN_IMAGE_MSE, (mse_after, MEAN_IMAGE_MSE)


def test_save_and_load_round_trip(trained_autoencoder, tmp_path):
    ae = load_autoencoder(trained_autoencoder)
    folder = save_autoencoder(ae, tmp_path / "copy")
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]  # no temporary folder left behind
    again = load_autoencoder(folder)
    assert again.config.scaling_factor == ae.config.scaling_factor
    with torch.no_grad():  # reloaded float32 weights, the same batch: the default tolerance
        torch.testing.assert_close(
            encode_latents(again, HELD_OUT[:4]), encode_latents(ae, HELD_OUT[:4])
        )


def test_bad_folders_and_sizes_give_one_clear_error(trained_autoencoder, tmp_path):
    with pytest.raises(AutoencoderError, match="nothing: no config.json"):
        load_autoencoder(tmp_path / "nothing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "config.json").write_text("{not json")
    with pytest.raises(AutoencoderError, match="config.json is not valid JSON"):
        load_autoencoder(tmp_path / "junk")
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(AutoencoderError, match=r"'UNet2DModel' is not one of \['AutoencoderKL'"):
        load_autoencoder(tmp_path / "unet")
    (tmp_path / "no-weights").mkdir()
    config = json.loads((trained_autoencoder / "config.json").read_text())
    (tmp_path / "no-weights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(AutoencoderError, match="no-weights: cannot load weights"):
        load_autoencoder(tmp_path / "no-weights")
    ae = load_autoencoder(trained_autoencoder)
    assert check_resolution(ae, 32) == 8
    with pytest.raises(
        AutoencoderError,
        match="resolution 18 is not a positive multiple of .* downsampling factor 4; use e.g. 16",
    ):
        check_resolution(ae, 18)
    with pytest.raises(AutoencoderError, match="not a positive multiple"):
        AutoencoderModule(resolution=30)  # the default f4
    with pytest.raises(AutoencoderError, match="kind 'gan' is not 'vq' or 'kl'"):
        AutoencoderModule(kind="gan")
