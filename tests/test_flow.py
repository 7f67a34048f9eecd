"""Flow-matching family: loss, training and resume, sampling = StableDiffusion3Pipeline, pipeline
folders, LoRA, errors.

Every model is the `tiny` preset at 16x16 pixels over a random KL autoencoder built in code
(f2: 8x8x4 latents), captions cut to 77 characters; nothing is downloaded.
"""

import pytest
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_pipeline import other_transformer_lora, save_tiny_pipeline, tiny_vae

from lightning_mia.card import CARD_KEY, read_card
from lightning_mia.data.datamodule import MembershipDataModule
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.base import per_caption_randn
from lightning_mia.models.diffusion import LatentDiffusionModule
from lightning_mia.models.flow import FlowMatchingModule
from lightning_mia.models.lora import LoraError, export_lora, load_lora
from lightning_mia.models.pipeline_folder import PipelineError, pipeline_layout
from lightning_mia.models.registry import load_family_module
from lightning_mia.models.vae import save_autoencoder
from lightning_mia.registry import UnknownNameError

RES = 16
SOURCE = ShapesSource(num_samples=16, resolution=RES, seed=3)
CAPTIONS = [SOURCE.caption(i)[:77] for i in SOURCE.sample_ids()]

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """A random f2 KL autoencoder folder (16x16 pixels -> 8x8x4 latents)."""
    torch.manual_seed(0)
    ae = tiny_vae()
    return save_autoencoder(ae, tmp_path_factory.mktemp("flow") / "autoencoder")


def make_model(autoencoder, seed=0, **kwargs) -> FlowMatchingModule:
    torch.manual_seed(seed)
    defaults = dict(resolution=RES, max_caption_length=77, num_inference_steps=3)
    return FlowMatchingModule(autoencoder=str(autoencoder), **{**defaults, **kwargs})


def shapes_batch(ids):
    return {
        "pixel_values": torch.stack([SOURCE.image(i) for i in ids]),
        "caption": [CAPTIONS[i] for i in ids],
        "sample_id": torch.tensor(ids, dtype=torch.int64),
    }


def fixed_loss(model, batch):
    """per_sample_loss (B,) at fixed times and noise, in eval mode (no caption dropout)."""
    b = len(batch["caption"])
    noise = torch.randn(b, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model.per_sample_loss(batch, times=torch.linspace(0.1, 0.9, b), noise=noise)
    model.train(was_training)
    return loss


def test_training_steps_lower_the_loss_on_a_fixed_batch(autoencoder):
    model = make_model(autoencoder, caption_dropout=0.0)
    batch = shapes_batch([0, 1, 2, 3])
    before = fixed_loss(model, batch)
    assert before.shape == (4,) and torch.isfinite(before).all()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    for _ in range(20):
        loss = model.per_sample_loss(batch).mean()  # random times and noise
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss(model, batch).mean() < 0.8 * before.mean()
    assert not any(p.requires_grad for p in model.vae.parameters())  # the autoencoder is frozen
    assert model.vae.training is False  # and stays in eval mode


def test_generate_is_seeded_shaped_and_independent_of_the_batch(autoencoder):
    model = make_model(autoencoder).eval()
    images = model.generate(CAPTIONS[:3], num_images=2, seed=5)
    assert images.shape == (3, 2, 3, RES, RES) and images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(model.generate(CAPTIONS[:3], 2, seed=5), images, rtol=0, atol=0)
    alone = model.generate(CAPTIONS[1:2], num_images=2, seed=[6])  # caption 1's seed is 5 + 1
    # the same transformer passes in a batch of another size: GEMM blockings differ (float32,
    # ~1e-6 relative per op over 3 Euler steps and the decoder; measured <= 1e-6)
    torch.testing.assert_close(alone[0], images[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model.generate(CAPTIONS[:1], 2, seed=9)[0], images[0])


@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_generate_equals_stable_diffusion_3_pipeline(autoencoder, scale):
    model = make_model(autoencoder).eval()
    captions, n = CAPTIONS[:2], 2
    images = model.generate(captions, num_images=n, seed=[4, 7], guidance_scale=scale)
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    noise = per_caption_randn([4, 7], (n, *model.latent_shape)).flatten(0, 1)  # the same noise
    out = pipe(
        captions,
        num_images_per_prompt=n,
        latents=noise,
        num_inference_steps=3,
        guidance_scale=scale,
        height=RES,
        width=RES,
        max_sequence_length=model.t5_length,
        output_type="pt",
    ).images  # (B*N, 3, H, W) in [0, 1]
    # same weights, noise, timesteps and Euler steps: the pipeline encodes the null caption once
    # per image (ours once, then repeated) and maps to [0, 1] in another order, so outputs
    # differ by float32 rounding only (measured 6e-7 on AVX-512 and AVX2 kernels)
    torch.testing.assert_close(out, (images.flatten(0, 1) + 1) / 2, rtol=0, atol=1e-5)


def test_pipeline_folder_round_trips(autoencoder, tmp_path):
    model = make_model(autoencoder).eval()
    folder = model.save_pipeline(tmp_path / "sd3")
    assert pipeline_layout(folder).family == "flow"
    loaded = FlowMatchingModule(
        preset="pretrained", pretrained=str(folder), autoencoder="", resolution=0
    ).eval()
    assert loaded.resolution == RES and loaded.hparams.num_inference_steps == 20
    torch.testing.assert_close(
        loaded.generate(CAPTIONS[:2], 2, 1, 3), model.generate(CAPTIONS[:2], 2, 1, 3)
    )
    batch = shapes_batch([0, 1])
    torch.testing.assert_close(fixed_loss(loaded, batch), fixed_loss(model, batch))
    pipe = StableDiffusion3Pipeline.from_pretrained(
        str(folder), text_encoder_3=None, tokenizer_3=None, local_files_only=True
    )
    assert isinstance(pipe.transformer, SD3Transformer2DModel)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tiny", "flux-tiny"])  # both architectures, one module
def test_fit_checkpoints_and_resume_continues_the_global_step(autoencoder, tmp_path, preset):
    dm = MembershipDataModule(
        str(tmp_path), ShapesSource(num_samples=32, resolution=RES), num_shadows=1, batch_size=4
    )
    run = dm.layout.run_dir("flow", 0)

    def fit(steps, ckpt_path=None):
        seed_everything(0)
        model = make_model(
            autoencoder, preset=preset, ema_decay=0.9, warmup_steps=2, max_caption_length=128
        )
        checkpoints = ModelCheckpoint(
            dirpath=run / "checkpoints", save_last=True, every_n_train_steps=1
        )
        trainer = Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[checkpoints],
            default_root_dir=run,
        )
        trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
        return model, trainer

    fit(3)
    last = run / "checkpoints" / "last.ckpt"
    card = read_card(last)
    assert (card.family, card.run_name) == ("flow", "flow-target-000")
    saved = torch.load(last, weights_only=True)
    assert len(saved[CARD_KEY]["autoencoder_sha256"]) == 64
    assert not any(k.startswith("vae.") for k in saved["state_dict"])  # kept in its folder
    assert int(saved["state_dict"]["ema.num_updates"]) == 3
    resumed, trainer = fit(5, str(last))
    assert trainer.global_step == 5 and int(resumed.ema.num_updates) == 5
    loaded = load_family_module(last)  # rebuilt from the checkpoint alone (step 5)
    assert isinstance(loaded, FlowMatchingModule) and not loaded.training
    assert loaded.arch.name == ("flux" if preset == "flux-tiny" else "sd3")
    for name, value in resumed.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], value, msg=name)


def test_lora_trains_adapters_only_and_exports_in_diffusers_format(autoencoder, tmp_path):
    model = make_model(autoencoder, lora_rank=2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)  # the base weights are frozen
    assert {n.split(".")[0] for n in trained} == {"transformer", "text_encoder", "text_encoder_2"}
    assert any("add_q_proj.lora_A" in n for n in trained)  # the text stream's projections too
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # an adapter that changes the model
    folder = export_lora(model.eval(), tmp_path / "lora")
    fresh = make_model(autoencoder, lora_rank=0).eval()
    before = fresh.generate(CAPTIONS[:1], 1, 0)
    load_lora(fresh, folder)
    after = fresh.generate(CAPTIONS[:1], 1, 0)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, model.generate(CAPTIONS[:1], 1, 0), rtol=1e-5, atol=1e-5)


def test_a_trained_part_keeps_float32_buffers_under_a_frozen_dtype(autoencoder):
    """SD3's patch embedding owns no parameter but holds the sin/cos position table: it trains
    with the transformer, so it stays float32; the frozen CLIPs and VAE are bfloat16."""
    model = make_model(autoencoder, frozen_dtype="bfloat16", train_text_encoder=False)
    table = model.transformer.pos_embed.pos_embed
    assert table.dtype == torch.float32 and table.is_floating_point()
    assert {p.dtype for p in model.transformer.parameters()} == {torch.float32}
    frozen = (model.vae, model.text_encoder, model.text_encoder_2)
    assert {p.dtype for part in frozen for p in part.parameters()} == {torch.bfloat16}
    assert fixed_loss(model, shapes_batch([0, 1])).dtype == torch.float32


def test_bad_inputs_give_one_clear_error(autoencoder, tmp_path):
    with pytest.raises(
        UnknownNameError, match=r"unknown flow preset 'huge'; known: \['tiny', 'sd3-256'"
    ):
        make_model(autoencoder, preset="huge")
    sd = save_tiny_pipeline(tmp_path / "sd15")
    with pytest.raises(
        PipelineError,
        match="holds a StableDiffusionPipeline .* the flow family runs SD3Transformer2DModel "
        ".* the diffusion family's",
    ):
        FlowMatchingModule(preset="pretrained", pretrained=str(sd), autoencoder="")
    sd3 = make_model(autoencoder).save_pipeline(tmp_path / "sd3")
    with pytest.raises(
        PipelineError,
        match="holds a StableDiffusion3Pipeline .* the flow family's .configs/flow/pretrained.yaml",
    ):
        LatentDiffusionModule(preset="pretrained", pretrained=str(sd3), autoencoder="")
    unet_lora = export_lora(
        LatentDiffusionModule(
            autoencoder=str(autoencoder), resolution=RES, lora_rank=2, train_text_encoder=False
        ),
        tmp_path / "unet_lora",
    )
    with pytest.raises(LoraError, match="no weight of it fits this StableDiffusion3Pipeline"):
        load_lora(make_model(autoencoder), unet_lora)
    with pytest.raises(LoraError, match="diffusers cannot load it"):
        load_lora(make_model(autoencoder), other_transformer_lora(tmp_path / "other"))
    with pytest.raises(ValueError, match="resolution 16"):
        make_model(autoencoder).per_sample_loss(
            {**shapes_batch([0]), "pixel_values": torch.zeros(1, 3, 32, 32)}
        )
