"""Sharded training (FSDP2 under Lightning's `ModelParallelStrategy`, `models/sharding.py`) of the
flow family's FLUX architecture, as `configs/flow/flux-pretrained.yaml` asks for it on GPUs (and
of the diffusion family's UNet): 2 CPU processes (gloo) through `train.py fit`, the transformer
and the text encoders trained in full.

It trains what DDP trains: from the same seed, after the same steps, the one full checkpoint holds
the weights of a `ddp` run within float32 reduction noise, its card counts both ranks' samples, and
every later stage reads it like any other. Settings it cannot honour get one line and no run.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import seed_everything
from tiny_pipeline import tiny_vae

from lightning_mia.card import read_card
from lightning_mia.models.flow import FlowMatchingModule
from lightning_mia.models.registry import load_family_module
from lightning_mia.models.sharding import block_lists
from lightning_mia.models.vae import save_autoencoder

ROOT = Path(__file__).resolve().parents[1]
# Weights after 4 and 6 AdamW steps at lr 2e-3 (each step moves a weight by up to 2e-3): DDP
# all-reduces each gradient, FSDP2 reduce-scatters it, summing the ranks' float32 values in
# another order, which Adam divides by the gradient's own size (measured, AVX-512 kernels:
# <= 3.2e-5 at both; CLIP's key biases, whose gradient is zero but for rounding, 9e-5: not
# compared).
WEIGHT_TOL = 3e-4
LAST = Path("exp", "flow-target-000", "checkpoints", "last.ckpt")


def sharded_strategy(devices: int) -> dict:
    """flux-pretrained.yaml's strategy, over `devices` CPU ranks with gloo."""
    config = yaml.safe_load((ROOT / "configs" / "flow" / "flux-pretrained.yaml").read_text())
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"].endswith("ModelParallelStrategy")
    args = strategy["init_args"]
    assert args["tensor_parallel_size"] == 1 and args["save_distributed_checkpoint"] is False
    return {
        "class_path": strategy["class_path"],
        "init_args": {**args, "data_parallel_size": devices, "process_group_backend": "gloo"},
    }


FLOW = "lightning_mia.models.flow.FlowMatchingModule"
DIFFUSION = "lightning_mia.models.diffusion.LatentDiffusionModule"


def tiny_config(tmp: Path, strategy, max_steps: int = 3, family: str = FLOW, **model) -> Path:
    """A 2-rank fit at 16 px over a random autoencoder, in `tmp`: flux-tiny, or the diffusion
    family's tiny UNet."""
    autoencoder = tmp.parent / "autoencoder"
    if not autoencoder.exists():
        torch.manual_seed(0)
        save_autoencoder(tiny_vae(), autoencoder)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 2,
            "strategy": strategy,
            "max_steps": max_steps,
            "logger": False,
            "enable_progress_bar": False,
        },
        "model": {
            "class_path": family,
            "init_args": {
                **({"preset": "flux-tiny"} if family == FLOW else {}),
                "autoencoder": str(autoencoder),
                "resolution": 16,
                "max_caption_length": 77,
                "num_inference_steps": 2,
                "num_preview_images": 1,
                "lr": 0.002,
                **model,
            },
        },
        "data": {
            "experiment": str(tmp / "exp"),
            "source": {
                "class_path": "lightning_mia.data.shapes.ShapesSource",
                "init_args": {"num_samples": 64, "resolution": 16},
            },
            "num_shadows": 1,
            "target_size": 16,
            "aux_size": 16,
            "shadow_size": 16,
            "public_size": 16,
            "batch_size": 2,
            "num_workers": 0,
        },
    }
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "fit.yaml").write_text(yaml.safe_dump(config))
    return tmp / "fit.yaml"


def fit(config: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "train.py", "fit", "--config", str(config), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow  # four 2-process training runs through train.py
def test_sharded_training_and_its_resume_match_ddp_with_one_full_checkpoint(tmp_path):
    """4 steps (two epochs of 4 members x 2 ranks), then resumed from `last` to 6 steps, sharded
    and under `ddp`, from the same seed: the weights agree at both points."""
    strategies = {"sharded": sharded_strategy(2), "ddp": "ddp"}
    configs = {name: tiny_config(tmp_path / name, s, max_steps=4) for name, s in strategies.items()}
    weights = {}
    for steps, resume in ((4, ()), (6, ("--ckpt_path", "last"))):
        for name, config in configs.items():
            edit_steps(config, steps)
            proc = fit(config, *resume)
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr
            weights[name, steps] = load_family_module(tmp_path / name / LAST)
        # flux-tiny trains all three in full (the CLIP, and the T5 a FLUX folder never trains)
        for part in ("transformer", "text_encoder", "text_encoder_2"):
            got = getattr(weights["sharded", steps], part).state_dict()
            for key, value in getattr(weights["ddp", steps], part).state_dict().items():
                if not key.endswith("k_proj.bias"):  # no gradient but rounding, Adam scales it
                    torch.testing.assert_close(got[key], value, rtol=0, atol=WEIGHT_TOL)
    for part in ("transformer", "text_encoder", "text_encoder_2"):  # the resume trained on
        four = getattr(weights["sharded", 4], part).state_dict()
        six = getattr(weights["sharded", 6], part).state_dict()
        assert max((six[k] - v).abs().max() for k, v in four.items()) > 10 * WEIGHT_TOL, part
    last = tmp_path / "sharded" / LAST
    assert last.is_file()  # one file, not a folder of shards
    card = read_card(last)
    assert (card.family, card.role) == ("flow", "target")
    assert card.train_steps_per_image == pytest.approx(6 * 2 * 2 / 8)  # 8 members, both ranks
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 6
    state = checkpoint["state_dict"]
    assert not [k for k in state if k.startswith("vae.")]  # the autoencoder stays out
    assert all(type(v) is torch.Tensor for v in state.values())  # gathered, not DTensors
    assert (last.parents[1] / "samples.png").is_file()  # the preview grid, every rank generating
    images = weights["sharded", 6].eval().generate(["a red circle"], num_images=1, seed=0)
    assert images.shape == (1, 1, 3, 16, 16) and torch.isfinite(images).all()


def edit_steps(config: Path, steps: int) -> None:
    settings = yaml.safe_load(config.read_text())
    settings["trainer"]["max_steps"] = steps
    config.write_text(yaml.safe_dump(settings))


@pytest.mark.slow  # two 2-process training runs through train.py
def test_the_diffusion_family_shards_its_unet_and_trains_as_ddp(tmp_path):
    """The hook is the latent families' (`LatentTextToImageModule.configure_model`): the UNet's
    down and up blocks become units of their own, its frozen CLIP stays whole; 3 steps."""
    last = Path("exp", "diffusion-target-000", "checkpoints", "last.ckpt")
    models = {}
    for name, strategy in (("sharded", sharded_strategy(2)), ("ddp", "ddp")):
        proc = fit(tiny_config(tmp_path / name, strategy, family=DIFFUSION))
        assert proc.returncode == 0, proc.stderr[-3000:]
        models[name] = load_family_module(tmp_path / name / last)
    assert read_card(tmp_path / "sharded" / last).train_steps_per_image == pytest.approx(1.5)
    seed_everything(0)  # the command's seed_everything: 0, then the module: its start
    start = type(models["ddp"])(**models["ddp"].hparams).unet.state_dict()
    got, want = models["sharded"].unet.state_dict(), models["ddp"].unet.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=WEIGHT_TOL)
    assert max((got[k] - v).abs().max() for k, v in start.items()) > 10 * WEIGHT_TOL


@pytest.mark.slow  # a 2-process start
def test_settings_sharding_cannot_honour_get_one_line_naming_each(tmp_path):
    strategy = sharded_strategy(2)
    strategy["init_args"].update(
        save_distributed_checkpoint=True, data_parallel_size=1, tensor_parallel_size=2
    )
    proc = fit(tiny_config(tmp_path / "run", strategy, ema_decay=0.99))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "ema_decay > 0" in line]
    assert errors and all(
        "save_distributed_checkpoint: false" in line and "tensor_parallel_size 2" in line
        for line in errors
    )
    assert not list((tmp_path / "run" / "exp").rglob("*.ckpt"))


def test_blocks_are_the_outermost_module_lists(tmp_path):
    """The units `shard_trained_parts` makes, for flux-tiny's parts: the transformer's double-
    and single-stream blocks, the CLIP's layers, the T5's blocks (not the lists inside them)."""
    torch.manual_seed(0)
    autoencoder = save_autoencoder(tiny_vae(), tmp_path / "autoencoder")
    model = FlowMatchingModule(preset="flux-tiny", autoencoder=str(autoencoder), resolution=16)
    flux = model.transformer
    assert block_lists(flux) == [flux.transformer_blocks, flux.single_transformer_blocks]
    assert block_lists(model.text_encoder) == [model.text_encoder.encoder.layers]
    assert block_lists(model.text_encoder_2) == [model.text_encoder_2.encoder.block]
