"""Complexity of the query image alone: what a reconstruction error owes to the image, not to
membership. No model is queried.

    complexity_features(query)  # (B, 3, H, W) in [-1, 1] -> {"complexity/...": (B,)}

A detailed image is hard to reconstruct whether or not the model trained on it, so a raw
reconstruction error (denoising loss, SecMI's t-error, PIA's distance, pixel MSE, code NLL) ranks
images by complexity as much as by membership. Normalising the error by the image's own
complexity is the query-free counterpart of LiRA's per-sample difficulty calibration: FreMIA
(ICML 2026) filters the frequencies a model reconstructs poorly for every image; compressed-size
normalisation (rectified-flow MIA; the zlib ratio of Carlini et al. 2021 for language models)
divides by how well a generic compressor does. The attack stage fits the normalisation on the
training (shadow) rows and reports it as the `<attack>-cc` row (`lightning_mia.attack.complexity`).

Features, on images mapped to [0, 1]:
- `complexity/highpass`: the mean squared high-frequency residual x - lowpass(x), all channels,
  where lowpass keeps the spatial frequencies within `LOWPASS_CUTOFF` of the Nyquist frequency
  (an ideal radial filter in the 2-D FFT): the detail a reconstruction has to reproduce.
- `complexity/png_bpp`: bits per pixel of the image as a lossless PNG (PIL, 8-bit RGB,
  compression level `PNG_LEVEL`): how much a generic compressor cannot predict.

Both are floored at `FLOOR` so that their logarithm exists for a flat image.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from lightning_mia.features.groups import FeatureGroup, register_group

LOWPASS_CUTOFF = 0.25  # share of the Nyquist frequency the low-pass filter keeps
PNG_LEVEL = 9  # zlib level of the PNG encoder: deterministic, the smallest file
FLOOR = 1e-8  # smallest complexity value (a flat image has no high frequencies)


def _unit(query: torch.Tensor) -> torch.Tensor:
    if query.ndim != 4 or query.shape[1] != 3:
        raise ValueError(f"expected query images (B, 3, H, W), got {tuple(query.shape)}")
    return ((query.detach().float().cpu() + 1) / 2).clamp(0, 1)  # (B, 3, H, W) in [0, 1]


def highpass_energy(query: torch.Tensor, cutoff: float = LOWPASS_CUTOFF) -> torch.Tensor:
    """Mean squared residual (B,) of (B, 3, H, W) images in [-1, 1] after an ideal radial
    low-pass filter keeping frequencies |f| <= cutoff x Nyquist (on the [0, 1] pixel scale)."""
    x = _unit(query)
    h, w = x.shape[-2:]
    fy = torch.fft.fftfreq(h).abs()[:, None] * 2  # (H, 1), in units of Nyquist
    fx = torch.fft.fftfreq(w).abs()[None, :] * 2  # (1, W)
    keep = (fy**2 + fx**2).sqrt() <= cutoff  # (H, W)
    low = torch.fft.ifft2(torch.fft.fft2(x) * keep).real  # (B, 3, H, W)
    return (x - low).square().mean(dim=(1, 2, 3)).clamp(min=FLOOR)


def png_bits_per_pixel(query: torch.Tensor, level: int = PNG_LEVEL) -> torch.Tensor:
    """Bits per pixel (B,) of each (3, H, W) image in [-1, 1] saved as an 8-bit RGB PNG."""
    from PIL import Image

    x = (_unit(query) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
    sizes = []
    for image in x:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG", compress_level=level)
        sizes.append(8.0 * buf.tell() / (image.shape[0] * image.shape[1]))
    return torch.tensor(sizes, dtype=torch.float32).clamp(min=FLOOR)


@torch.no_grad()
def complexity_features(query: torch.Tensor) -> dict[str, torch.Tensor]:
    """`complexity/highpass` and `complexity/png_bpp` (B,) of query images (B, 3, H, W) in
    [-1, 1], on the query's device."""
    return {
        "complexity/highpass": highpass_energy(query).to(query.device),
        "complexity/png_bpp": png_bits_per_pixel(query).to(query.device),
    }


register_group(FeatureGroup("complexity", lambda x: complexity_features(x.query)))
