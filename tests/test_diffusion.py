"""Latent diffusion family: loss, training and resume, sampling, diffusers folders, errors.

Every model is the `tiny` preset at 16x16 pixels over the shared trained KL autoencoder
(conftest.py `trained_autoencoder`: 4x4x4 latents), captions cut to 77 characters. That the
preset memorises its training pairs after 300 steps is checked by
`benchmarks/bench_memorisation.py --check diffusion`.
"""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_mia.card import CARD_KEY, CheckpointError, RunCard, read_card
from lightning_mia.data.datamodule import MembershipDataModule
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.diffusion import LatentDiffusionModule
from lightning_mia.models.pipeline_folder import PipelineError
from lightning_mia.models.registry import load_family_module
from lightning_mia.models.vae import AutoencoderError

RES = 16
SOURCE = ShapesSource(num_samples=16, resolution=RES, seed=3)
CAPTIONS = [SOURCE.caption(i) for i in SOURCE.sample_ids()]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def make_model(autoencoder, seed=0, **kwargs) -> LatentDiffusionModule:
    torch.manual_seed(seed)
    defaults = dict(resolution=RES, max_caption_length=77, num_inference_steps=4)
    return LatentDiffusionModule(autoencoder=str(autoencoder), **{**defaults, **kwargs})


def shapes_batch(ids):
    return {
        "pixel_values": torch.stack([SOURCE.image(i) for i in ids]),
        "caption": [SOURCE.caption(i) for i in ids],
        "sample_id": torch.tensor(ids, dtype=torch.int64),
    }


def trainer(max_steps, callbacks=(), root=None):
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=bool(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        default_root_dir=root,
    )


def fixed_loss(model, batch):
    """per_sample_loss (B,) at fixed timesteps and noise, in eval mode (no caption dropout)."""
    b = len(batch["caption"])
    timesteps = torch.linspace(50, 750, b).long()
    noise = torch.randn(b, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model.per_sample_loss(batch, timesteps=timesteps, noise=noise)
    model.train(was_training)
    return loss


def test_training_steps_lower_the_loss_on_a_fixed_batch(trained_autoencoder):
    model = make_model(trained_autoencoder, caption_dropout=0.0)
    batch = shapes_batch([0, 1, 2, 3])
    before = fixed_loss(model, batch)
    assert before.shape == (4,) and torch.isfinite(before).all()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(20):
        loss = model.per_sample_loss(batch).mean()  # random timesteps and noise
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss(model, batch)
    assert after.mean() < 0.7 * before.mean(), (before, after)
    assert not any(p.requires_grad for p in model.vae.parameters())  # the autoencoder is frozen


@pytest.mark.slow
def test_fit_checkpoints_and_resume_continues_the_global_step(trained_autoencoder, tmp_path):
    dm = MembershipDataModule(
        str(tmp_path), ShapesSource(num_samples=32, resolution=RES), num_shadows=1, batch_size=4
    )
    run = dm.layout.run_dir("diffusion", 0)

    def checkpoints():  # the same callback both times (its state resumes: last.ckpt, no -v1)
        return ModelCheckpoint(dirpath=run / "checkpoints", save_last=True, every_n_train_steps=1)

    seed_everything(0)
    first = make_model(trained_autoencoder, ema_decay=0.9, warmup_steps=2)
    trainer(3, [checkpoints()], run).fit(first, datamodule=dm)
    last = run / "checkpoints" / "last.ckpt"
    card = read_card(last)
    assert (card.family, card.run_name) == ("diffusion", "diffusion-target-000")
    assert card.autoencoder == str(trained_autoencoder)
    assert card.train_steps_per_image == pytest.approx(3 * 4 / 8)  # 8 members, batch 4
    saved = torch.load(last, weights_only=True)
    assert len(saved[CARD_KEY]["autoencoder_sha256"]) == 64
    assert not any(k.startswith("vae.") for k in saved["state_dict"])  # kept in its folder
    assert int(saved["state_dict"]["ema.num_updates"]) == 3

    seed_everything(0)
    resumed = make_model(trained_autoencoder, ema_decay=0.9, warmup_steps=2)
    t = trainer(5, [checkpoints()], run)
    t.fit(resumed, datamodule=dm, ckpt_path=str(last))
    assert t.global_step == 5
    assert int(resumed.ema.num_updates) == 5  # the EMA kept counting too
    assert resumed.train_steps_per_image == pytest.approx(5 * 4 / 8)

    loaded = load_family_module(last)  # rebuilt from the checkpoint alone (step 5)
    assert isinstance(loaded, LatentDiffusionModule) and not loaded.training
    for name, value in resumed.state_dict().items():  # stored float32 values: equal
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)
    assert loaded.generate(CAPTIONS[:1], num_images=2).shape == (1, 2, 3, RES, RES)


@pytest.mark.parametrize("scheduler", ["DDIMScheduler", "DDPMScheduler"])
def test_generate_is_seeded_shaped_and_independent_of_the_batch(trained_autoencoder, scheduler):
    model = make_model(trained_autoencoder, scheduler=scheduler).eval()
    images = model.generate(CAPTIONS[:3], num_images=2, seed=5)
    assert images.shape == (3, 2, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    # the same call again: the same float ops on the same thread count, bitwise
    torch.testing.assert_close(model.generate(CAPTIONS[:3], 2, seed=5), images, rtol=0, atol=0)
    assert not torch.allclose(model.generate(CAPTIONS[:3], 2, seed=6), images)
    assert not torch.allclose(images[:, 0], images[:, 1])  # the N images of a caption differ
    # Alone or in a batch of another size: the same images up to float32 reordering (GEMM and
    # conv blockings follow the batch and the CPU's ISA), ~1e-6 per UNet pass in pixels of
    # [-1, 1] after 4 steps and the decoder (measured <= 4e-6 on AVX-512 and AVX2 kernels);
    # a seeding bug would differ by O(1).
    close = dict(rtol=0.0, atol=5e-5)
    alone = torch.cat([model.generate([CAPTIONS[i]], 2, seed=[5 + i]) for i in range(3)])
    torch.testing.assert_close(alone, images, **close)
    model.hparams.generation_batch_size = 2  # one caption per denoising loop
    torch.testing.assert_close(model.generate(CAPTIONS[:3], 2, seed=5), images, **close)
    assert model.generate([], 2).shape == (0, 2, 3, RES, RES)


def test_generate_equals_diffusers_pipeline_per_caption(trained_autoencoder):
    model = make_model(trained_autoencoder).eval()
    before = {name: type(p) for name, p in model.unet.attn_processors.items()}
    images = model.generate(CAPTIONS[:3], num_images=2, seed=[4, 5, 6])  # (3, 2, 3, H, W)
    # the sampling loop's own cross-attention processors are gone again
    assert {name: type(p) for name, p in model.unet.attn_processors.items()} == before
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    for i, seed in enumerate([4, 5, 6]):  # diffusers' attention, one call per caption
        ref = (
            pipe(
                prompt=CAPTIONS[i],
                num_images_per_prompt=2,
                num_inference_steps=4,
                guidance_scale=3.0,
                height=RES,
                width=RES,
                output_type="pt",
                generator=torch.Generator().manual_seed(seed),
            ).images
            * 2
            - 1
        )
        # float32 reordering only (keys and values projected once, queries grouped by
        # context): as batch independence above, measured 2.6e-6
        torch.testing.assert_close(images[i], ref, rtol=0.0, atol=5e-5)


def test_pipeline_folder_round_trips(trained_autoencoder, tmp_path):
    model = make_model(trained_autoencoder).eval()
    folder = model.save_pipeline(tmp_path / "pipe")
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        assert (folder / part).exists(), part
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert pipe.unet.config.sample_size == model.latent_shape[-1]
    loaded = make_model(  # another init seed: only loading the weights can make them agree
        "", seed=1, preset="pretrained", pretrained=str(folder), max_caption_length=128
    ).eval()
    assert loaded.tokenizer.model_max_length == model.tokenizer.model_max_length == 77
    batch = shapes_batch([0, 1, 2])
    # the same weights through the same ops and batch: the default float32 tolerance
    torch.testing.assert_close(fixed_loss(loaded, batch), fixed_loss(model, batch))
    torch.testing.assert_close(
        loaded.generate(CAPTIONS[:2], 2, seed=0), model.generate(CAPTIONS[:2], 2, seed=0)
    )


def test_bad_inputs_give_one_clear_error(trained_autoencoder, tmp_path):
    with pytest.raises(AutoencoderError, match="no-such-folder: no config.json"):
        make_model(tmp_path / "no-such-folder")
    with pytest.raises(ValueError, match="needs `autoencoder: <diffusers folder>`"):
        make_model("")
    with pytest.raises(AutoencoderError, match="resolution 18 is not a positive multiple"):
        make_model(trained_autoencoder, resolution=18)
    with pytest.raises(ValueError, match="scheduler 'DDIM' is not a diffusers scheduler class"):
        make_model(trained_autoencoder, scheduler="DDIM")
    with pytest.raises(ValueError, match="unknown diffusion preset 'huge'; known"):
        make_model(trained_autoencoder, preset="huge")
    with pytest.raises(PipelineError, match=r"no config.json in \[.unet., .vae."):
        make_model("", preset="pretrained", pretrained=str(tmp_path))

    model = make_model(trained_autoencoder)

    def checkpoint(family, autoencoder_sha256):
        card = RunCard(
            family,
            "tiny",
            model_index=0,
            splits_hash="x",
            experiment="e",
            autoencoder_sha256=autoencoder_sha256,
        )
        path = tmp_path / f"{family}-{autoencoder_sha256[:4]}.ckpt"
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}
        torch.save(
            {
                "state_dict": state,
                "hyper_parameters": dict(model.hparams),
                CARD_KEY: card.to_dict(),
                "pytorch-lightning_version": "2.6.6",
            },
            path,
        )
        return path

    good = checkpoint("diffusion", model.vae_fingerprint())
    LatentDiffusionModule.load_from_checkpoint(good, weights_only=True)  # the control
    with pytest.raises(CheckpointError, match="family 'seq2seq', not 'diffusion'"):
        LatentDiffusionModule.load_from_checkpoint(
            checkpoint("seq2seq", model.vae_fingerprint()), weights_only=True
        )
    with pytest.raises(CheckpointError, match="different autoencoder"):
        LatentDiffusionModule.load_from_checkpoint(
            checkpoint("diffusion", "0" * 64), weights_only=True
        )
