"""`ImageFileSource`: the part shared by sources that keep one image file per sample (COCO, an
image folder): decoding by path, the registration check and duplicate digests by file content.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lightning_mia.data.checks import NOT_CONTENT, file_image_problems
from lightning_mia.data.images import decode_image
from lightning_mia.data.sources import DIGEST_BYTES, ImageCaptionSource, file_digests


class ImageFileSource(ImageCaptionSource):
    """A source whose sample `i` is the image file `image_path(i)` and a caption."""

    def image_path(self, sample_id: int) -> Path:
        """The image file of a sample."""
        raise NotImplementedError

    def image_name(self, sample_id: int) -> str:
        """How messages name a sample's image: its path and id."""
        return f"{self.image_path(sample_id)} (id {sample_id})"

    def image(self, sample_id: int, resolution: int | None = None) -> torch.Tensor:
        path = self.image_path(sample_id)
        return decode_image(path, resolution or self.resolution, self.image_name(sample_id))

    def image_problems(self, ids: Sequence[int], stop_early: bool = False) -> dict[int, str]:
        """Decode each file in full, once per file content (see `file_image_problems`)."""
        return file_image_problems(ids, self.image_path, self.image_name, stop_early)

    def image_digests(self, ids: Sequence[int]) -> np.ndarray:
        """The sha256 of each image file (its first 16 bytes, `S16`), cached by size and mtime."""
        hexes = file_digests([self.image_path(i) for i in ids])
        raw = [bytes.fromhex(h)[:DIGEST_BYTES] if h not in NOT_CONTENT else b"" for h in hexes]
        return np.array(raw, dtype=f"S{DIGEST_BYTES}")
