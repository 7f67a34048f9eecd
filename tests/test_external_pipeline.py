"""The pretrained path of the diffusion family on StableDiffusionPipeline folders built in code:
the folder's scheduler config and prediction type, fp16 variants, native resolution, and the
folders it refuses (another family, missing parts) with one line each."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from tiny_pipeline import RES, save_tiny_pipeline

from lightning_mia.models.diffusion import LatentDiffusionModule
from lightning_mia.models.pipeline_folder import (
    PipelineError,
    native_resolution,
    pipeline_sha256,
    weights_variant,
)

CAPTION = "a red circle on a blue background"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def pretrained(folder, **kwargs) -> LatentDiffusionModule:
    args = dict(preset="pretrained", pretrained=str(folder), autoencoder="", resolution=0)
    return LatentDiffusionModule(**{**args, "num_inference_steps": 4, **kwargs}).eval()


def diffusers_images(folder, seed, steps, scale) -> torch.Tensor:
    """What diffusers itself makes of the folder (its own scheduler), (1, 3, H, W) in [-1, 1]."""
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        CAPTION,
        num_inference_steps=steps,
        guidance_scale=scale,
        output_type="pt",
        generator=torch.Generator().manual_seed(seed),
        height=RES,
        width=RES,
    )
    return out.images * 2 - 1


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_the_folders_schedule_and_prediction_type_are_trained_and_sampled(
    tmp_path, prediction_type
):
    folder = save_tiny_pipeline(tmp_path / "sd", prediction_type=prediction_type)
    model = pretrained(folder)
    config = model.noise_scheduler.config
    assert (config.prediction_type, config.beta_schedule) == (prediction_type, "scaled_linear")
    assert (config.beta_start, config.beta_end, config.clip_sample) == (0.00085, 0.012, False)
    assert model.make_sampler().config.prediction_type == prediction_type
    assert model.resolution == native_resolution(folder) == RES  # sample_size 8 x VAE factor 2

    latents = torch.randn(2, *model.latent_shape)
    noise, t = torch.randn_like(latents), torch.tensor([100, 700])
    out = model.denoise(latents, model.encode_text([CAPTION] * 2), t, noise)
    expected = (
        noise
        if prediction_type == "epsilon"
        else model.noise_scheduler.get_velocity(latents, noise, t)
    )
    torch.testing.assert_close(out.target, expected)

    # sampling: the module's batched loop agrees with diffusers' own pipeline on the folder
    ours = model.generate([CAPTION], num_images=1, seed=[3], guidance_scale=2.0)[:, 0]
    torch.testing.assert_close(ours, diffusers_images(folder, 3, 4, 2.0), atol=2e-4, rtol=0)


def test_an_asked_schedule_that_contradicts_the_folder_is_warned_about(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "sd", prediction_type="v_prediction")
    with pytest.warns(UserWarning, match="prediction_type='epsilon' \\(folder: 'v_prediction'\\)"):
        model = pretrained(folder, prediction_type="epsilon")
    assert model.noise_scheduler.config.prediction_type == "epsilon"


def test_fp16_variant_folders_load_into_float32(tmp_path):
    full = save_tiny_pipeline(tmp_path / "fp32")
    half = save_tiny_pipeline(tmp_path / "fp16", variant="fp16")
    assert not (half / "unet" / "diffusion_pytorch_model.safetensors").exists()
    assert weights_variant(half / "unet") == "fp16" and weights_variant(full / "unet") is None
    a, b = pretrained(full), pretrained(half)
    for part in ("unet", "text_encoder", "vae"):
        assert {p.dtype for p in getattr(b, part).parameters()} == {torch.float32}, part
        reference = dict(getattr(a, part).named_parameters())
        for name, p in getattr(b, part).named_parameters():  # the fp16-rounded weights
            torch.testing.assert_close(p, reference[name].half().float(), msg=name)
    assert b.generate([CAPTION], 1).shape == (1, 1, 3, RES, RES)
    assert pipeline_sha256(half) != pipeline_sha256(full)


def test_folders_it_cannot_run_are_refused_in_one_line(tmp_path):
    folder = save_tiny_pipeline(tmp_path / "sd")
    index = json.loads((folder / "model_index.json").read_text())
    other = tmp_path / "sdxl"
    save_tiny_pipeline(other)
    (other / "model_index.json").write_text(
        json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"})
    )
    with pytest.raises(PipelineError, match="holds a StableDiffusionXLPipeline \\(model_index"):
        pretrained(other)
    with pytest.raises(PipelineError, match="no such folder"):
        pretrained(tmp_path / "nowhere")
    (folder / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(PipelineError, match="no scheduler/scheduler_config.json"):
        pretrained(folder)
    with pytest.raises(ValueError, match="resolution 0 is not a positive multiple"):
        LatentDiffusionModule(autoencoder=str(folder / "vae"), resolution=0)  # tiny: no native
