"""Attack I: pixel-level distance between the query image x and each generated image g_k.

    pixel_features(query, generated)  # (B, 3, H, W), (B, N, 3, H, W) -> 12 features (B,)

Per k: MSE, PSNR and SSIM between x and g_k, all on images mapped from [-1, 1] to [0, 1]
(`data_range=1`); aggregated over the N images of a query as mean, min, max and std. Also home of
`aggregate_over_images`, the aggregation every feature group shares.

- PSNR of identical images is infinite; it is clamped to `MAX_PSNR_DB` (100 dB, an MSE of 1e-10)
  so classifiers and shards never see inf.
- If the generated images have another resolution than the query, the query is resized to the
  generated resolution (bilinear, antialiased): the model's output is what is being judged, and
  its resolution is fixed by the model.
- SSIM uses torchmetrics' Gaussian window (11 px, sigma 1.5), which needs H, W >= 11.

LiRA calibrates `pixel/psnr_max` = -10 log10(min_k MSE): the closest of the N generated images
(a memorised pair is reproduced by at least one of them), on a log scale, where per-sample
scores are much closer to the Gaussians LiRA fits than the skewed, positive MSE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

from lightning_mia.features.groups import FeatureGroup, register_group
from lightning_mia.specs.attacks import AttackSpec, register_attack

STATS = ("mean", "min", "max", "std")
MAX_PSNR_DB = 100.0


def aggregate_over_images(per_image: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """(B, N) per-generated-image values -> {f"{prefix}_{mean,min,max,std}": (B,)}.

    The std is the population std (0 for N = 1, never NaN).
    """
    if per_image.ndim != 2:
        raise ValueError(f"{prefix}: expected (B, N) values, got shape {tuple(per_image.shape)}")
    values = per_image.float()
    return {
        f"{prefix}_mean": values.mean(1),
        f"{prefix}_min": values.amin(1),
        f"{prefix}_max": values.amax(1),
        f"{prefix}_std": values.std(1, correction=0),
    }


def match_resolution(query: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (B, 3, H, W) query images to `size` (bilinear, antialiased) if they differ."""
    if tuple(query.shape[-2:]) == tuple(size):
        return query
    return F.interpolate(query, size=size, mode="bilinear", antialias=True, align_corners=False)


def check_pair(query: torch.Tensor, generated: torch.Tensor) -> None:
    """One clear error for query/generated tensors of the wrong shapes."""
    if query.ndim != 4 or generated.ndim != 5 or query.shape[0] != generated.shape[0]:
        raise ValueError(
            "expected query (B, 3, H, W) and generated (B, N, 3, H', W'), got "
            f"{tuple(query.shape)} and {tuple(generated.shape)}"
        )
    if query.shape[1] != 3 or generated.shape[2] != 3:
        raise ValueError(f"expected RGB images, got {tuple(query.shape)}, {tuple(generated.shape)}")


@torch.no_grad()
def pixel_features(query: torch.Tensor, generated: torch.Tensor) -> dict[str, torch.Tensor]:
    """MSE, PSNR, SSIM between x and each g_k, aggregated over k: 12 features of shape (B,).

    query: (B, 3, H, W) in [-1, 1]; generated: (B, N, 3, H', W') in [-1, 1].
    Names: `pixel/{mse,psnr,ssim}_{mean,min,max,std}`.
    """
    check_pair(query, generated)
    b, n = generated.shape[:2]
    query = match_resolution(query, generated.shape[-2:])
    x = ((query.float() + 1) / 2).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
    g = ((generated.float() + 1) / 2).clamp(0, 1).flatten(0, 1)  # (B*N, 3, H, W)
    x = x[:, None].expand(b, n, *x.shape[1:]).flatten(0, 1)  # (B*N, 3, H, W)
    mse = (x - g).square().mean(dim=(1, 2, 3))
    psnr = peak_signal_noise_ratio(g, x, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = psnr.nan_to_num(posinf=MAX_PSNR_DB).clamp(max=MAX_PSNR_DB)
    ssim = structural_similarity_index_measure(g, x, data_range=1.0, reduction="none")
    out: dict[str, torch.Tensor] = {}
    for name, values in (("mse", mse), ("psnr", psnr), ("ssim", ssim)):
        out.update(aggregate_over_images(values.view(b, n), f"pixel/{name}"))
    return out


register_group(FeatureGroup("pixel", lambda x: pixel_features(x.query, x.generated)))
register_attack(
    AttackSpec(
        "pixel",
        ("pixel",),
        "black-box",
        "attack I: MSE, PSNR, SSIM between the query image and each of the N generated images",
        score_feature="pixel/psnr_max",
        paper=1,
        score_scale="identity",  # PSNR is already -10 log10(MSE)
        calibrated_by=("complexity",),
    )
)
