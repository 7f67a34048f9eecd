"""Training-time image augmentation shared by both families: it changes what each training
step shows of an image, and so how much a model memorises (the card records it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def augment_images(x: torch.Tensor, random_crop: bool, random_flip: bool) -> torch.Tensor:
    """Random resized crop (80-100% of the side, bilinear back to R) and horizontal flip, each
    drawn per sample, of images (B, 3, R, R) in [-1, 1]; the same shape back."""
    b, _, r, _ = x.shape
    if random_flip:
        flip = torch.rand(b, device=x.device).lt(0.5).view(b, 1, 1, 1)
        x = torch.where(flip, x.flip(-1), x)
    if random_crop:
        sides = torch.randint(int(0.8 * r), r + 1, (b,)).tolist()
        crops = []
        for i, s in enumerate(sides):
            top, left = torch.randint(0, r - s + 1, (2,)).tolist()
            patch = x[i : i + 1, :, top : top + s, left : left + s]
            crops.append(F.interpolate(patch, size=(r, r), mode="bilinear", antialias=True))
        x = torch.cat(crops).clamp(-1, 1)
    return x
