"""An image captioner for the attacker who holds only the image (ATTACKS.md): BLIP, local folder.

    captioner = Captioner("runs/demo/captioner")  # ours (captioner_train.py) or a real BLIP folder
    check_captioner("runs/demo/captioner", splits.hash)  # a BLIP; ours: trained on this experiment?
    captions = captioner.caption(images)  # (B, 3, H, W) in [-1, 1] -> B non-empty strings, greedy

The folder holds a `BlipForConditionalGeneration` (config.json + weights), its tokenizer, and
optionally `preprocessor_config.json` or `processor_config.json` (what `BlipProcessor`
writes), from which only the image size, mean and std are read:
images are resized (bicubic, antialiased, square) and normalised in torch on their own device,
so no image processor class (nor PIL round trip) is needed. Decoding is greedy and batched.
A folder trained by `CaptionerModule` also holds `card.json` (experiment, splits hash, pool);
a pretrained one (e.g. Salesforce's blip-image-captioning-base) has none and is taken as is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BlipForConditionalGeneration

from lightning_mia.card import RunCard
from lightning_mia.models.encoder import ATTACKER_POOLS, CLIP_MEAN, CLIP_STD, EncoderError

PREPROCESSOR_FILE = "preprocessor_config.json"
PROCESSOR_FILE = "processor_config.json"  # transformers 5: the image processor nested inside
CARD_FILE = "card.json"


class CaptionerError(EncoderError):
    """A folder that does not hold a usable BLIP captioner, or captions that cannot be used."""


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CaptionerError(f"captioner folder {folder}: {name} is not JSON ({err})") from err


def _preprocessing(folder: Path, default_size: int) -> tuple[int, tuple, tuple]:
    """(image size, mean, std) from preprocessor_config.json (hub BLIP folders), else from the
    `image_processor` of processor_config.json (`BlipProcessor.save_pretrained` in transformers
    5), else the model's size and CLIP's normalisation."""
    if (folder / PREPROCESSOR_FILE).is_file():
        cfg = _read_json(folder, PREPROCESSOR_FILE)
    elif (folder / PROCESSOR_FILE).is_file():
        cfg = _read_json(folder, PROCESSOR_FILE).get("image_processor") or {}
    else:
        return default_size, CLIP_MEAN, CLIP_STD
    size = cfg.get("size", default_size)
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge", default_size))
    return int(size), tuple(cfg.get("image_mean", CLIP_MEAN)), tuple(cfg.get("image_std", CLIP_STD))


def blip_pixel_values(
    images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> BLIP input (B, 3, S, S): bicubic resize, then (x - mean) / std.

    `mean`, `std`: (1, 3, 1, 1). Training (`CaptionerModule`) and captioning share this.
    """
    x = (images.float() + 1) / 2
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return (x.clamp(0, 1) - mean.to(x.device)) / std.to(x.device)


def blip_preprocessor_config(size: int, mean: tuple, std: tuple) -> dict[str, Any]:
    """A `BlipImageProcessor` config with this size and normalisation (what `Captioner` reads)."""
    return {
        "image_processor_type": "BlipImageProcessor",
        "processor_class": "BlipProcessor",
        "size": {"height": size, "width": size},
        "image_mean": list(mean),
        "image_std": list(std),
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "resample": 3,  # bicubic
        "rescale_factor": 1 / 255,
    }


def read_captioner_card(folder: str | os.PathLike) -> RunCard | None:
    """The run card of a captioner trained here, or None for a pretrained folder (no card.json)."""
    path = Path(folder)
    if not (path / CARD_FILE).is_file():
        return None
    card = _read_json(path, CARD_FILE)
    if card.get("family") != "captioner":
        raise CaptionerError(
            f"captioner folder {path}: {CARD_FILE} is a {card.get('family')!r} run card, "
            "not a captioner's"
        )
    return RunCard.from_dict(card)


def check_captioner_card(folder: str | os.PathLike, splits_hash: str) -> RunCard | None:
    """Refuse a captioner trained on another experiment's splits or on a model's members.

    Returns its card (None for a pretrained folder without card.json, which cannot be checked:
    it never saw this experiment's data). Raises `CaptionerError` in one line otherwise.
    """
    card = read_captioner_card(folder)
    if card is None:
        return None
    pool = card.train_split
    if pool not in ATTACKER_POOLS:
        raise CaptionerError(
            f"captioner folder {folder}: trained on the {pool!r} split; an attacker's captioner "
            f"trains on its own pool ({' or '.join(ATTACKER_POOLS)}), never a model's members"
        )
    if card.splits_hash != splits_hash:
        raise CaptionerError(
            f"captioner folder {folder}: trained on experiment {card.experiment} (splits hash "
            f"{card.splits_hash[:12]}), not on this experiment's pools (splits hash "
            f"{splits_hash[:12]}); train one here: python train.py fit --config "
            "configs/captioner/tiny.yaml --data.experiment <this experiment>"
        )
    return card


def check_captioner(folder: str | os.PathLike, splits_hash: str) -> RunCard | None:
    """Refuse, in one line and before anything is loaded or written, a folder that is not a
    BLIP captioner or a captioner trained here on another experiment or on a model's members;
    returns its card (None for a pretrained folder)."""
    _check_folder(Path(folder))
    return check_captioner_card(folder, splits_hash)


def captioner_facts(folder: str | os.PathLike) -> dict[str, Any]:
    """What a report records of a captioner: its folder and, for one trained here, its
    training steps and held-out quality (card.json)."""
    card = read_captioner_card(folder)
    facts: dict[str, Any] = {"folder": str(Path(folder).resolve())}
    if card is not None:
        facts["train_steps"] = card.train_steps
        facts["quality"] = dict(card.quality)
    return facts


def _check_folder(path: Path) -> None:
    """One clear error unless `path` looks like a BLIP captioner folder."""
    if not (path / "config.json").is_file():
        raise CaptionerError(f"captioner folder {path}: no config.json (not a transformers model)")
    config = _read_json(path, "config.json")
    if config.get("model_type") != "blip":
        raise CaptionerError(
            f"captioner folder {path}: model_type is {config.get('model_type')!r}, not 'blip'"
        )
    architectures = config.get("architectures") or ["BlipForConditionalGeneration"]
    if "BlipForConditionalGeneration" not in architectures:
        raise CaptionerError(
            f"captioner folder {path}: a {architectures[0]}, not a BlipForConditionalGeneration "
            "(an image-captioning BLIP)"
        )


class Captioner(torch.nn.Module):
    """Greedy BLIP captions of image batches, from a local transformers folder."""

    def __init__(self, folder: str, max_new_tokens: int = 40, prompt: str = "") -> None:
        """
        Args:
            folder: local folder of a `BlipForConditionalGeneration` and its tokenizer.
            max_new_tokens: longest caption, in tokens.
            prompt: text the caption continues (e.g. "a picture of"); "" = none.
        """
        super().__init__()
        path = Path(folder)
        _check_folder(path)
        try:
            self.model = BlipForConditionalGeneration.from_pretrained(
                str(path), local_files_only=True
            )
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as err:  # noqa: BLE001 - missing weights or tokenizer: one clear error
            raise CaptionerError(f"captioner folder {path}: cannot load BLIP ({err})") from err
        vocab = int(self.model.config.text_config.vocab_size)
        if len(self.tokenizer) > vocab:
            raise CaptionerError(
                f"captioner folder {path}: tokenizer has {len(self.tokenizer)} tokens but the "
                f"model's vocabulary is {vocab} (a tokenizer of another model)"
            )
        self.model.eval().requires_grad_(False)
        size, mean, std = _preprocessing(path, int(self.model.config.vision_config.image_size))
        self.folder, self.image_size = path, size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.max_new_tokens = max_new_tokens
        self.prompt = prompt

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> BLIP input (B, 3, S, S)."""
        return blip_pixel_values(images, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def caption(self, images: torch.Tensor) -> list[str]:
        """Greedy captions of (B, 3, H, W) images in [-1, 1]: B non-empty strings.

        Raises `CaptionerError` if a caption comes out empty (or only the prompt): the target
        would otherwise be queried with no text.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got {tuple(images.shape)}")
        if next(self.model.parameters()).device != images.device:
            self.model.to(images.device)
        texts = greedy_captions(
            self.model, self.tokenizer, self.pixel_values(images), self.max_new_tokens, self.prompt
        )
        check_captions(texts, self.folder, self.prompt)
        return texts


@torch.no_grad()
def greedy_captions(
    model: BlipForConditionalGeneration,
    tokenizer: Any,
    pixel_values: torch.Tensor,
    max_new_tokens: int,
    prompt: str = "",
) -> list[str]:
    """Greedy, batched BLIP captions of (B, 3, S, S) BLIP inputs: B stripped strings (maybe "").

    At most `max_new_tokens`, and never past the decoder's position embeddings (a small model's
    own limit; going past it would index out of range)."""
    kwargs, start = {}, 1  # the decoder starts from its bos token
    if prompt:
        enc = tokenizer([prompt] * len(pixel_values), return_tensors="pt")
        kwargs = {k: enc[k].to(pixel_values.device) for k in ("input_ids", "attention_mask")}
        start = enc["input_ids"].shape[1]
    room = int(model.config.text_config.max_position_embeddings) - start
    ids = model.generate(
        pixel_values=pixel_values,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max(min(max_new_tokens, room), 1),
        **kwargs,
    )  # (B, T)
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]


def check_captions(captions: list[str], folder: str | os.PathLike, prompt: str = "") -> None:
    """Raise `CaptionerError` naming the images (batch positions) whose caption is empty."""
    prompt = prompt.strip().lower()
    empty = [i for i, text in enumerate(captions) if not text or text.lower() == prompt]
    if empty:
        shown = ", ".join(map(str, empty[:8])) + (", ..." if len(empty) > 8 else "")
        raise CaptionerError(
            f"captioner folder {folder}: empty caption for {len(empty)} of {len(captions)} "
            f"images (batch positions {shown}); the target cannot be queried with no text. "
            "Train the captioner longer or use another one"
        )
