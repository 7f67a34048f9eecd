"""An image captioner for the attacker who holds only the image (ATTACKS.md): BLIP, local folder.

    captioner = Captioner("/models/blip-image-captioning-base")  # a transformers folder
    captions = captioner.caption(images)  # (B, 3, H, W) in [-1, 1] -> B strings, greedy

The folder holds a `BlipForConditionalGeneration` (config.json + weights), its tokenizer, and
optionally `preprocessor_config.json`, from which only the image size, mean and std are read:
images are resized (bicubic, antialiased, square) and normalised in torch on their own device,
so no image processor class (nor PIL round trip) is needed. Decoding is greedy and batched.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BlipForConditionalGeneration

from lightning_mia.models.encoder import CLIP_MEAN, CLIP_STD, EncoderError

PREPROCESSOR_FILE = "preprocessor_config.json"


class CaptionerError(EncoderError):
    """A folder that does not hold a usable BLIP captioner."""


def _preprocessing(folder: Path, default_size: int) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) from preprocessor_config.json, else the model's size and CLIP's."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return default_size, CLIP_MEAN, CLIP_STD
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CaptionerError(f"captioner folder {folder}: {path.name} is not JSON ({err})") from err
    size = cfg.get("size", default_size)
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", default_size))
    return int(size), tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


class Captioner(torch.nn.Module):
    """Greedy BLIP captions of image batches, from a local transformers folder."""

    def __init__(self, folder: str, max_new_tokens: int = 30, prompt: str = "") -> None:
        """
        Args:
            folder: local folder of a `BlipForConditionalGeneration` and its tokenizer.
            max_new_tokens: longest caption, in tokens.
            prompt: text the caption continues (e.g. "a picture of"); "" = none.
        """
        super().__init__()
        path = Path(folder)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CaptionerError(
                f"captioner folder {path}: no config.json (not a transformers model)"
            )
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        if model_type != "blip":
            raise CaptionerError(
                f"captioner folder {path}: model_type is {model_type!r}, not 'blip'"
            )
        try:
            self.model = BlipForConditionalGeneration.from_pretrained(
                str(path), local_files_only=True
            )
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:  # noqa: BLE001 - missing weights or tokenizer: one clear error
            raise CaptionerError(f"captioner folder {path}: cannot load BLIP ({err})") from err
        self.model.eval().requires_grad_(False)
        size, mean, std = _preprocessing(path, int(self.model.config.vision_config.image_size))
        self.image_size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> BLIP input (B, 3, S, S)."""
        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        return (x.clamp(0, 1) - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def caption(self, images: torch.Tensor) -> list[str]:
        """Greedy captions of (B, 3, H, W) images in [-1, 1]: B strings."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        if next(self.model.parameters()).device != images.device:
            self.model.to(images.device)
        kwargs = {}
        if self.prompt:
            enc = self.tokenizer([self.prompt] * len(images), return_tensors="pt")
            kwargs = {k: enc[k].to(images.device) for k in ("input_ids", "attention_mask")}
        ids = self.model.generate(
            pixel_values=self.pixel_values(images),
            do_sample=False,
            num_beams=1,
            max_new_tokens=self.max_new_tokens,
            **kwargs,
        )
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
