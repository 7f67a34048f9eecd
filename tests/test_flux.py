"""The flow family's FLUX architecture (`FluxTransformer2DModel`, `models.flow_arch`): sampling =
FluxPipeline (classifier-free and guidance-distilled), FluxPipeline folders both ways, training,
LoRA on the transformer, errors. The gray-box signals run on it in `test_flow_signals.py`.

Every model is the `flux-tiny` preset at 16x16 pixels over a random KL autoencoder built in
code (f2: 8x8x4 latents, 16 packed tokens); nothing is downloaded.
"""

import json
import logging
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from test_flow import CAPTIONS, RES, fixed_loss, shapes_batch  # the SD3 tests' data and loss
from tiny_pipeline import save_tiny_sd3_pipeline, tiny_vae

from lightning_mia.models.base import per_caption_randn
from lightning_mia.models.diffusion import LatentDiffusionModule
from lightning_mia.models.flow import FlowMatchingModule
from lightning_mia.models.flow_arch import pack, unpack
from lightning_mia.models.flow_presets import FLUX_LAYOUT, FlowError
from lightning_mia.models.lora import LORA_WEIGHTS, LoraError, export_lora, load_lora
from lightning_mia.models.pipeline_folder import (
    PipelineError,
    native_resolution,
    pipeline_layout,
)
from lightning_mia.models.precision import cpu_flash_attention_runs, usable_cpu_attention
from lightning_mia.models.vae import save_autoencoder

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    """A random f2 KL autoencoder folder (16x16 pixels -> 8x8x4 latents)."""
    torch.manual_seed(0)
    return save_autoencoder(tiny_vae(), tmp_path_factory.mktemp("flux") / "autoencoder")


def make_model(autoencoder, seed=0, **kwargs) -> FlowMatchingModule:
    torch.manual_seed(seed)
    defaults = dict(
        preset="flux-tiny", resolution=RES, max_caption_length=77, num_inference_steps=3
    )
    return FlowMatchingModule(autoencoder=str(autoencoder), **{**defaults, **kwargs})


@pytest.fixture(scope="module")
def folder(autoencoder, tmp_path_factory):
    """The flux-tiny model saved as a FluxPipeline folder."""
    return make_model(autoencoder).eval().save_pipeline(tmp_path_factory.mktemp("fp") / "flux")


def folder_settings(folder, **overrides) -> dict:
    """A rank-2 LoRA of the tiny FLUX folder's transformer (its text encoders as they are)."""
    settings = dict(
        preset="pretrained",
        pretrained=str(folder),
        autoencoder="",
        resolution=RES,
        max_sequence_length=77,
        lora_rank=2,
        train_text_encoder=False,
    )
    return {**settings, **overrides}


def perturb_adapters(model) -> None:
    """Non-zero LoRA B matrices (B starts at 0: the base model)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)


def pipeline_images(model, captions, seeds, n, scale, **kwargs):
    """FluxPipeline's images (B*N, 3, H, W) in [0, 1] from the noise `generate` starts from."""
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    noise = per_caption_randn(seeds, (n, *model.latent_shape)).flatten(0, 1)
    return pipe(
        captions,
        num_images_per_prompt=n,
        latents=pack(noise),  # the pipeline keeps its latents packed
        num_inference_steps=3,
        height=RES,
        width=RES,
        max_sequence_length=model.t5_length,
        output_type="pt",
        **kwargs,
    ).images


def test_packing_is_fluxs_2x2_patches_and_round_trips():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    packed = pack(x)
    assert packed.shape == (2, 2 * 3, 3 * 4)
    # token (row 0, column 1) holds every channel's 2x2 patch at rows 0-1, columns 2-3
    torch.testing.assert_close(packed[0, 1], x[0, :, 0:2, 2:4].reshape(-1))
    torch.testing.assert_close(unpack(packed, 4, 6), x)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_generate_equals_flux_pipeline(autoencoder, scale):
    """Classifier-free guidance as FluxPipeline's true CFG (an empty negative prompt)."""
    model = make_model(autoencoder).eval()
    captions, n = CAPTIONS[:2], 2
    images = model.generate(captions, num_images=n, seed=[4, 7], guidance_scale=scale)
    cfg = dict(true_cfg_scale=scale, negative_prompt=[""] * len(captions)) if scale > 1 else {}
    out = pipeline_images(model, captions, [4, 7], n, scale, **cfg)
    # same weights, noise, sigmas and Euler steps; we batch the null caption's rows with the
    # captions' (the pipeline makes two passes): equal to float32 rounding (0 measured here)
    torch.testing.assert_close(out, (images.flatten(0, 1) + 1) / 2, rtol=0, atol=1e-5)
    assert images.std() > 0.01


def test_a_guidance_distilled_transformer_reads_the_scale_and_makes_one_pass(autoencoder):
    """FLUX.1-dev style: the guidance embedding takes the scale, no classifier-free pass."""
    model = make_model(autoencoder).eval()
    config = {**model.transformer.config, "guidance_embeds": True}
    torch.manual_seed(5)
    model.transformer = FluxTransformer2DModel.from_config(config).eval()
    captions = CAPTIONS[:2]
    calls = []
    hook = model.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append(1), with_kwargs=True
    )
    images = model.generate(captions, num_images=1, seed=[1, 2], guidance_scale=3.5)
    hook.remove()
    assert len(calls) == 3  # one pass per step: the embedding, not a doubled batch
    out = pipeline_images(model, captions, [1, 2], 1, 3.5, guidance_scale=3.5)
    torch.testing.assert_close(out, (images.flatten(0, 1) + 1) / 2, rtol=0, atol=1e-5)
    other = model.generate(captions, num_images=1, seed=[1, 2], guidance_scale=1.5)
    assert (other - images).abs().max() > 1e-4  # the scale reaches the network
    # training and the gray-box signals ask it at the module's guidance_scale
    batch = shapes_batch([0, 1])
    model.hparams.guidance_scale = 3.5
    at_35 = fixed_loss(model, batch)
    model.hparams.guidance_scale = 1.5
    assert (fixed_loss(model, batch) - at_35).abs().max() > 1e-6


def test_a_dynamically_shifted_schedule_as_flux_1_dev_has(autoencoder):
    """FLUX.1-dev's scheduler (shift by the number of image tokens): the sampler's sigmas and
    images are FluxPipeline's; training times stay unshifted, as the scheduler's own training
    sigmas and diffusers' FLUX training scripts leave them."""
    model = make_model(autoencoder).eval()
    model.noise_scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
    )
    captions = CAPTIONS[:2]
    images = model.generate(captions, num_images=1, seed=[3, 4], guidance_scale=1.0)
    out = pipeline_images(model, captions, [3, 4], 1, 1.0)
    torch.testing.assert_close(out, (images.flatten(0, 1) + 1) / 2, rtol=0, atol=1e-5)
    assert model.training_shift == 1.0
    model.noise_scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert model.training_shift == 3.0


def test_flux_pipeline_folder_round_trips(autoencoder, folder):
    model = make_model(autoencoder).eval()
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert pipeline_layout(folder) is FLUX_LAYOUT and FLUX_LAYOUT.family == "flow"
    # FLUX transformers carry no sample_size: the pipeline's default 128 latents (x f2 here)
    assert native_resolution(folder, FLUX_LAYOUT) == 128 * 2
    loaded = FlowMatchingModule(
        preset="pretrained",
        pretrained=str(folder),
        autoencoder="",
        resolution=RES,
        max_sequence_length=model.t5_length,  # the folder's T5 would read 512 by default
        train_text_encoder=False,  # a FLUX folder's text encoders are never trained here
    ).eval()
    assert loaded.arch.name == "flux" and loaded.text_encoder_3 is None
    torch.testing.assert_close(
        loaded.generate(CAPTIONS[:2], 2, 1, 3), model.generate(CAPTIONS[:2], 2, 1, 3)
    )
    batch = shapes_batch([0, 1])
    torch.testing.assert_close(fixed_loss(loaded, batch), fixed_loss(model, batch))
    pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True)
    assert isinstance(pipe.transformer, FluxTransformer2DModel)


def test_training_steps_lower_the_loss_on_a_fixed_batch(autoencoder):
    model = make_model(autoencoder, caption_dropout=0.0)
    batch = shapes_batch([0, 1, 2, 3])
    before = fixed_loss(model, batch)
    assert before.shape == (4,) and torch.isfinite(before).all()
    trained = [p for p in model.parameters() if p.requires_grad]
    t5 = set(model.text_encoder_2.parameters())
    assert any(p in t5 for p in trained)  # from scratch, the T5 trains with the CLIP
    opt = torch.optim.AdamW(trained, lr=2e-3)
    model.train()
    for _ in range(20):
        loss = model.per_sample_loss(batch).mean()  # random times and noise
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fixed_loss(model, batch).mean() < 0.8 * before.mean()


def test_lora_trains_transformer_adapters_only_and_round_trips(folder, tmp_path):
    settings = folder_settings(folder)
    torch.manual_seed(0)
    model = FlowMatchingModule(**settings)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n and n.startswith("transformer.") for n in trained)
    perturb_adapters(model)  # an adapter that changes the model
    exported = export_lora(model.eval(), tmp_path / "lora")
    fresh = FlowMatchingModule(**{**settings, "lora_rank": 0}).eval()
    batch = shapes_batch([0, 1])
    assert not torch.allclose(fixed_loss(fresh, batch), fixed_loss(model, batch))
    load_lora(fresh, exported)
    torch.testing.assert_close(fixed_loss(fresh, batch), fixed_loss(model, batch))


def test_an_adapter_holding_less_than_its_config_loads_with_pefts_warning(folder, tmp_path):
    """peft's warning of targets without weights is held while the load may be refused
    (test_bad_inputs_give_one_clear_error) and shown when the adapter loads."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = FlowMatchingModule(**folder_settings(folder)).eval()
    perturb_adapters(model)
    exported = export_lora(model, tmp_path / "lora") / LORA_WEIGHTS
    with safe_open(str(exported), "pt") as f:
        metadata, keys = f.metadata(), [k for k in f.keys() if "single_transformer" not in k]
        kept = {k: f.get_tensor(k) for k in keys}
    save_file(kept, str(exported), metadata=metadata)
    fresh = FlowMatchingModule(**folder_settings(folder, lora_rank=0)).eval()
    with pytest.warns(RuntimeWarning, match=r"additional target modules: \['single_transformer"):
        load_lora(fresh, exported)
    loaded = {n for n, _ in fresh.named_parameters() if ".lora_" in n}
    assert loaded and not any("single_transformer" in n for n in loaded)


def test_a_flux_folders_clip_trains_with_its_text_encoder_switch_and_its_t5_never(folder, tmp_path):
    """`train_text_encoder` on a FLUX folder: its CLIP, in full or with LoRA (diffusers'
    train_dreambooth(_lora)_flux.py `--train_text_encoder`); the T5-XXL stays the folder's and
    out of checkpoints. A LoRA of both parts goes to FluxPipeline's format and back."""
    settings = folder_settings(folder, train_text_encoder=True)
    torch.manual_seed(0)
    lora = FlowMatchingModule(**settings)
    trained = {n.split(".")[0] for n, p in lora.named_parameters() if p.requires_grad}
    assert trained == {"transformer", "text_encoder"}
    assert all(".lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    assert not any(".lora_" in n for n, _ in lora.text_encoder_2.named_parameters())
    assert {k.split(".")[0] for k in lora.state_dict() if k != "samples_seen"} == trained
    perturb_adapters(lora)  # adapters that change the model, in both parts
    exported = export_lora(lora.eval(), tmp_path / "lora")
    pipe = FluxPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.load_lora_weights(str(exported))  # diffusers reads both parts' adapters
    assert all(hasattr(part, "peft_config") for part in (pipe.transformer, pipe.text_encoder))
    fresh = FlowMatchingModule(**folder_settings(folder, lora_rank=0)).eval()
    load_lora(fresh, exported)
    batch = shapes_batch([0, 1])
    torch.testing.assert_close(fixed_loss(fresh, batch), fixed_loss(lora, batch))

    full = FlowMatchingModule(**{**settings, "lora_rank": 0})  # a full fine-tune: transformer, CLIP
    trained = {n.split(".")[0] for n, p in full.named_parameters() if p.requires_grad}
    assert trained == {"transformer", "text_encoder"} and set(full._trained_parts()) == trained
    assert {k.split(".")[0] for k in full.state_dict() if k != "samples_seen"} == trained
    scratch = make_model(folder / "vae", lora_rank=2)  # flux-tiny: LoRA leaves its T5 as built
    assert "text_encoder_2" in scratch.never_trained
    assert not any(p.requires_grad for p in scratch.text_encoder_2.parameters())


# A LoRA of the tiny FLUX folder with the same adapters in float32 and in reduced precision:
# the per-sample losses differ by 1.2% (bfloat16) and 0.08% (float16) at most, the images of 3
# Euler steps by 0.025 and 0.0024 (pixel std 0.32; 20 steps: 0.020 and 0.0024), measured here;
# each bound holds 2.5-4x that.
REDUCED = {"bfloat16": (3e-2, 0.08), "float16": (3e-3, 0.01)}


@pytest.mark.parametrize("dtype", list(REDUCED))
def test_frozen_weights_in_reduced_precision_keep_adapters_and_scores_float32(folder, dtype):
    settings = folder_settings(folder, num_inference_steps=3)
    torch.manual_seed(0)
    full = FlowMatchingModule(**settings).eval()
    perturb_adapters(full)  # adapters that change the model
    half = FlowMatchingModule(**settings, frozen_dtype=dtype).eval()
    half.load_state_dict(full.state_dict())  # the adapters: all a LoRA checkpoint holds
    low = getattr(torch, dtype)
    for name, p in half.named_parameters():  # the folder's weights low, the adapters float32
        kept = name.startswith("text_encoder_2.") and ".wo." in name  # T5's, as transformers
        want = torch.float32 if p.requires_grad or (kept and dtype == "float16") else low
        assert p.dtype == want, (name, p.dtype)
        assert not p.requires_grad or ".lora_" in name
    assert {v.dtype for k, v in half.state_dict().items() if ".lora_" in k} == {torch.float32}
    loss_tol, image_tol = REDUCED[dtype]
    batch = shapes_batch([0, 1, 2, 3])
    want, got = fixed_loss(full, batch), fixed_loss(half, batch)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=loss_tol, atol=0)
    captions = ["a big red circle in the center", "a small blue star at the top"]
    images = half.generate(captions, num_images=2, seed=0)
    assert images.dtype == torch.float32
    torch.testing.assert_close(images, full.generate(captions, 2, seed=0), rtol=0, atol=image_tol)
    half.train()
    half.per_sample_loss(batch).mean().backward()  # float32 gradients reach the adapters only
    grads = {n: p.grad for n, p in half.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n and g.dtype == torch.float32 for n, g in grads.items())
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_bf16_attention_runs_on_this_cpu_under_any_kernels():
    """PyTorch 2.13's CPU flash attention fails in bf16 where ATen dispatches AVX2 kernels on a
    CPU with AMX (`ATEN_CPU_CAPABILITY=avx2` on a recent Xeon); `usable_cpu_attention`, which a
    bf16 flow module calls, switches to the math kernel there and changes nothing elsewhere."""
    usable_cpu_attention(torch.bfloat16)
    q = torch.randn(2, 4, 64, 32).to(torch.bfloat16)
    out = F.scaled_dot_product_attention(q, q, q)
    want = F.scaled_dot_product_attention(q.float(), q.float(), q.float())
    torch.testing.assert_close(out.float(), want, rtol=0, atol=0.03)
    assert torch.backends.cuda.flash_sdp_enabled() == cpu_flash_attention_runs(torch.bfloat16)


def test_a_pipeline_saved_with_a_frozen_dtype_is_float32_and_runs_in_diffusers(folder, tmp_path):
    """A full fine-tune with its text encoders and VAE in bfloat16 writes every part in float32
    (a plain from_pretrained mixes no dtypes) and keeps its own parts as they were."""
    model = FlowMatchingModule(**folder_settings(folder, lora_rank=0, frozen_dtype="bfloat16"))
    saved = model.eval().save_pipeline(tmp_path / "tuned")
    assert model.text_encoder_2.dtype == torch.bfloat16  # back to its dtype after saving
    pipe = FluxPipeline.from_pretrained(str(saved), local_files_only=True)
    assert {p.dtype for p in pipe.text_encoder_2.parameters()} == {torch.float32}
    images = pipe(
        CAPTIONS[:1],
        num_inference_steps=2,
        height=RES,
        width=RES,
        max_sequence_length=77,
        output_type="pt",
    ).images
    assert images.shape == (1, 3, RES, RES) and torch.isfinite(images).all()


def test_a_folders_frozen_parts_are_read_in_the_frozen_dtype(folder):
    """The dtype is chosen when a part is read, so a 12 B transformer is never held in float32;
    a part that trains is read in float32."""
    from lightning_mia.models.flow_arch import ARCHITECTURES
    from lightning_mia.models.flow_presets import FlowSpec, pretrained

    spec = FlowSpec(
        latent_channels=4,
        latent_size=RES // 2,
        vocab_size=1,  # (a folder's configs hold their own)
        pretrained=str(folder),
        frozen_parts=("transformer", "text_encoder_2"),
        frozen_dtype=torch.bfloat16,
    )
    arch = ARCHITECTURES["flux"]
    preset = pretrained(spec)
    assert arch.build_transformer(preset).dtype == torch.bfloat16
    clip, t5, _, _ = arch.build_text(preset)
    assert (clip.dtype, t5.dtype) == (torch.float32, torch.bfloat16)


def test_bad_inputs_give_one_clear_error(autoencoder, folder, tmp_path):
    from_folder = dict(preset="pretrained", pretrained=str(folder), autoencoder="")
    with pytest.raises(FlowError, match=r"frozen_dtype must be one of \['float32', .*'int8'"):
        FlowMatchingModule(**from_folder, resolution=RES, frozen_dtype="int8")
    for settings in (dict(preset="flux-tiny", autoencoder=str(autoencoder)), from_folder):
        with pytest.raises(FlowError, match="latent side must be even, got 7"):
            FlowMatchingModule(**settings, resolution=14, train_text_encoder=False)
    with pytest.raises(
        PipelineError,
        match=r"holds a FluxPipeline .* the flow family's .configs/flow/flux-pretrained.yaml",
    ):
        LatentDiffusionModule(preset="pretrained", pretrained=str(folder), autoencoder="")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "tokenizer_2")
    with pytest.raises(PipelineError, match=r"tokenizer_2/ \(FLUX's T5 tokenizer\) does not load"):
        FlowMatchingModule(**{**from_folder, "pretrained": str(broken)}, train_text_encoder=False)
    sd3 = save_tiny_sd3_pipeline(tmp_path / "sd3")
    sd3_model = FlowMatchingModule(**folder_settings(sd3, max_sequence_length=None))
    sd3_lora = export_lora(sd3_model, tmp_path / "sd3-lora")
    flux = FlowMatchingModule(**from_folder, resolution=RES, train_text_encoder=False)
    # its first two blocks' names and shapes match flux-tiny's: refused, not half loaded, and
    # whatever verbosity the user gave diffusers
    logger = logging.getLogger("diffusers")
    level = logger.level
    logger.setLevel(logging.ERROR)  # as DIFFUSERS_VERBOSITY=error
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            with pytest.raises(
                LoraError, match=r"\d+ of its weights fit no layer of this FluxPipeline"
            ):
                load_lora(flux, sd3_lora)
    finally:
        logger.setLevel(level)
    assert logger.level == level
    assert [str(w.message) for w in shown] == []  # the refusal is its one line (peft warned)
