"""Random-init modules of any registered text-to-image family, for the benchmarks.

    from _families import build_model, family_names, make_batch
    model, resolution = build_model("diffusion", "tiny", Path(tmp))   # any name in FAMILIES

Rules (a new family in `lightning_mia.models.base.FAMILIES` is benchmarked without edits here
when it follows the first two):
- The family class is called with `preset=` and, where its signature names them,
  `autoencoder=` (a random autoencoder folder written under `root`), `resolution=` (the
  autoencoder's) and `tokenizer=` (a caption BPE folder, for the families that need one).
- The autoencoder is a diffusers `AutoencoderKL` of the preset's size (the configs' kind for
  latent families: configs/autoencoder/tiny-kl.yaml, kl-f8-256.yaml), unless `SETUPS` says
  otherwise: seq2seq needs codes (a `VQModel`, configs/autoencoder/tiny.yaml, vqgan-f16-256.yaml)
  and a trained caption BPE (its `tokenizer: ""` means "train one at fit start", which a
  benchmark never reaches).
- A random model costs what a trained one of the same size costs: weights do not change FLOPs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, VQModel

from lightning_mia.data.shapes import ShapesSource
from lightning_mia.models.base import FAMILIES


@dataclass(frozen=True)
class Setup:
    """What a family's benchmark model is built over (the default suits latent families)."""

    autoencoder: str = "kl"  # "kl" (AutoencoderKL) or "vq" (VQModel: image codes)
    caption_bpe: bool = False  # train a caption BPE on the shapes captions, pass it as tokenizer


SETUPS = {"seq2seq": Setup(autoencoder="vq", caption_bpe=True)}  # any other family: Setup()

# (kind, preset) -> (resolution, block channels (f = 2^(n-1)), latent channels, codebook size)
AUTOENCODERS = {
    ("kl", "tiny"): (32, (32, 64, 64), 4, 0),  # tiny-kl.yaml: 8x8x4 latents
    ("kl", "ldm-256"): (256, (128, 256, 512, 512), 4, 0),  # kl-f8-256.yaml: 32x32x4
    ("kl", "sd3-256"): (256, (128, 256, 512, 512), 16, 0),  # SD3's f8 autoencoder: 32x32x16
    ("vq", "tiny"): (32, (32, 64, 64), 8, 512),  # tiny.yaml: 8x8 codes
    ("vq", "dalle-mini"): (256, (128, 128, 256, 256, 512), 256, 16384),  # vqgan-f16-256.yaml
}


def family_names() -> list[str]:
    """Every registered text-to-image family (their modules are imported to find them)."""
    return FAMILIES.names()


def family_presets(family: str) -> list[str]:
    """Presets a benchmark can build for `family` (those with an autoencoder size here)."""
    kind = SETUPS.get(family, Setup()).autoencoder
    return [preset for k, preset in AUTOENCODERS if k == kind]


def random_autoencoder(kind: str, preset: str, folder: Path) -> int:
    """Write a random autoencoder of `kind` sized for `preset` to `folder`; its resolution."""
    if (kind, preset) not in AUTOENCODERS:
        known = [p for k, p in AUTOENCODERS if k == kind]
        raise SystemExit(
            f"no {kind} autoencoder size for preset {preset!r} (known: {known}): add one to "
            "AUTOENCODERS in benchmarks/_families.py"
        )
    res, channels, latent, codes = AUTOENCODERS[(kind, preset)]
    n, big = len(channels), res > 32
    blocks = dict(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=latent,
        sample_size=res,
    )
    if kind == "kl":
        model = AutoencoderKL(
            **blocks,
            layers_per_block=2 if big else 1,
            norm_num_groups=32,
            mid_block_add_attention=big,
        )
    else:
        model = VQModel(
            **blocks,
            layers_per_block=2 if big else 1,
            num_vq_embeddings=codes,
            vq_embed_dim=latent,
            norm_num_groups=32 if big else 16,
            mid_block_add_attention=big,
        )
    model.save_pretrained(folder)
    return res


def caption_tokenizer(folder: Path) -> None:
    """A caption BPE trained on the shapes captions, saved to `folder`."""
    from lightning_mia.models.bart_tokenizer import train_caption_tokenizer

    source = ShapesSource(num_samples=256, resolution=32, seed=0)
    train_caption_tokenizer([source.caption(i) for i in range(256)], 512, folder)


def build_model(family: str, preset: str, root: Path) -> tuple[Any, int]:
    """(random-init module of `family` at `preset`, its image resolution), parts under `root`."""
    cls, setup = FAMILIES[family], SETUPS.get(family, Setup())
    params = inspect.signature(cls.__init__).parameters
    torch.manual_seed(0)
    kwargs: dict[str, Any] = {"preset": preset}
    res = random_autoencoder(setup.autoencoder, preset, root / "autoencoder")
    if "autoencoder" in params:
        kwargs["autoencoder"] = str(root / "autoencoder")
    if "resolution" in params:
        kwargs["resolution"] = res
    if setup.caption_bpe and "tokenizer" in params:
        caption_tokenizer(root / "tokenizer")
        kwargs["tokenizer"] = str(root / "tokenizer")
    model = cls(**kwargs)
    return model, int(getattr(model, "resolution", res))


def make_batch(batch: int, res: int, device: str) -> dict[str, Any]:
    """A query batch of the embedded shapes data: images, captions, sample ids."""
    source = ShapesSource(num_samples=batch, resolution=res, seed=1)
    return {
        "pixel_values": torch.stack([source.image(i) for i in range(batch)]).to(device),
        "caption": [source.caption(i) for i in range(batch)],
        "sample_id": torch.arange(batch),
    }


def shapes_items(num_samples: int, resolution: int) -> list[dict[str, Any]]:
    """Training items (image, caption, sample_id) of the embedded shapes data, in memory."""
    source = ShapesSource(num_samples=num_samples, resolution=resolution, seed=0)
    return [
        {"pixel_values": source.image(i), "caption": source.caption(i), "sample_id": i}
        for i in source.sample_ids()
    ]
