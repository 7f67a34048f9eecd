"""The frozen image autoencoder as the families see it: a diffusers folder, latents and codes.

    ae = load_autoencoder("runs/demo/autoencoder")   # VQModel or AutoencoderKL folder
    z = encode_latents(ae, images)                   # (B, 3, H, W) -> scaled (B, C, h, w)
    codes = encode_codes(vq, images)                 # VQModel: (B, h*w) int64 codebook indices

The diffusion family works in `encode_latents` space, the seq2seq family in `encode_codes`
space; these helpers (and `save_autoencoder`, which `AutoencoderModule` and the taming import
write with) are the only way the other modules talk to an autoencoder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel

from lightning_mia.errors import UserError
from lightning_mia.models.pipeline_folder import weights_variant

Autoencoder = VQModel | AutoencoderKL


class AutoencoderError(UserError):
    """An autoencoder folder that is missing or unusable, or an input it cannot take."""


AUTOENCODER_CLASSES = {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL}


# --- helpers used by both families -----------------------------------------------------------
def downsampling_factor(ae: Autoencoder) -> int:
    """Pixels per latent position along one side (each encoder block but the last halves)."""
    return 2 ** (len(ae.config.block_out_channels) - 1)


def check_resolution(ae: Autoencoder, resolution: int, where: str = "the autoencoder") -> int:
    """Latent side for `resolution`; AutoencoderError when the autoencoder cannot take it."""
    factor = downsampling_factor(ae)
    if resolution <= 0 or resolution % factor != 0:
        raise AutoencoderError(
            f"resolution {resolution} is not a positive multiple of {where}'s downsampling "
            f"factor {factor}; use e.g. {max(factor, resolution // factor * factor)}"
        )
    return resolution // factor


def load_autoencoder(folder: str | os.PathLike) -> Autoencoder:
    """Load a diffusers `VQModel` / `AutoencoderKL` folder (by `config.json`'s `_class_name`)."""
    path = Path(folder)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise AutoencoderError(
            f"autoencoder folder {path}: no config.json (train one with "
            "`train.py fit --config configs/autoencoder/tiny.yaml` or give a diffusers folder)"
        )
    try:
        class_name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as err:
        raise AutoencoderError(f"autoencoder folder {path}: config.json is not valid JSON") from err
    if class_name not in AUTOENCODER_CLASSES:
        raise AutoencoderError(
            f"autoencoder folder {path}: _class_name {class_name!r} is not one of "
            f"{sorted(AUTOENCODER_CLASSES)}"
        )
    try:
        # an fp16-variant folder (a Stable Diffusion vae/) loads into float32 too; random init
        # then load whether or not accelerate is installed, so the global RNG advances the same
        # on every machine (seeded runs draw the next model's weights after this)
        ae = AUTOENCODER_CLASSES[class_name].from_pretrained(
            str(path),
            local_files_only=True,
            variant=weights_variant(path),
            low_cpu_mem_usage=False,
        )
    except (OSError, ValueError, RuntimeError) as err:
        raise AutoencoderError(f"autoencoder folder {path}: cannot load weights ({err})") from err
    return ae.eval()


def latent_shift(ae: Autoencoder) -> float:
    """The autoencoder's `shift_factor` (SD3's VAE: 0.0609), 0 when it has none."""
    return float(getattr(ae.config, "shift_factor", None) or 0.0)


def encode_latents(ae: Autoencoder, x: torch.Tensor) -> torch.Tensor:
    """Scaled latents of images x (B, 3, H, W) in [-1, 1] -> (B, C, h, w).

    VQ: the pre-quantization latents (the diffusion works in the continuous space, the decoder
    quantizes); KL: the posterior mean. Both shifted by `shift_factor` (when set, as diffusers'
    SD3 pipelines) and multiplied by `ae.config.scaling_factor`.
    """
    if isinstance(ae, VQModel):
        z = ae.encode(x).latents
    else:
        z = ae.encode(x).latent_dist.mean
    shift = latent_shift(ae)
    return (z - shift if shift else z) * ae.config.scaling_factor


def decode_latents(ae: Autoencoder, z: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from scaled latents (B, C, h, w)."""
    z, shift = z / ae.config.scaling_factor, latent_shift(ae)
    images = ae.decode(z + shift if shift else z).sample
    return images.clamp(-1, 1)


def encode_codes(vq: VQModel, x: torch.Tensor) -> torch.Tensor:
    """Codebook indices (B, h*w) int64 of images x (B, 3, H, W), row-major over (h, w)."""
    h = vq.encode(x).latents  # (B, D, h, w)
    _, _, (_, _, indices) = vq.quantize(h)
    return indices.reshape(x.shape[0], -1).long()


def decode_codes(vq: VQModel, codes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from codebook indices (B, h*w) laid out as `hw`."""
    b = codes.shape[0]
    shape = (b, hw[0], hw[1], vq.quantize.vq_embed_dim)
    if vq.config.lookup_from_codebook:
        images = vq.decode(codes.reshape(-1), force_not_quantize=True, shape=shape).sample
    else:
        z_q = vq.quantize.get_codebook_entry(codes.reshape(-1), shape)  # (B, D, h, w)
        images = vq.decode(z_q, force_not_quantize=True).sample
    return images.clamp(-1, 1)


def save_autoencoder(ae: Autoencoder, folder: str | os.PathLike) -> Path:
    """`save_pretrained` the autoencoder into `folder`, file by file atomically.

    The folder may hold other things (the training run's checkpoints/ and logs), so files are
    written to a temporary subfolder and renamed into place, weights first, config.json last:
    a folder with a config.json always has matching weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".save-"))
    try:
        ae.save_pretrained(str(tmp), safe_serialization=True)
        names = sorted(p.name for p in tmp.iterdir())
        for name in sorted(names, key=lambda n: n == "config.json"):
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
