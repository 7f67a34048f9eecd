"""The attacker's image-text encoder E (attacks II and III): a transformers `CLIPModel`.

    python train.py fit --config configs/encoder/tiny.yaml    # trains on the auxiliary pool
    enc = load_encoder("runs/demo/encoder")                   # or any local CLIP folder
    enc.embed_images(images)  # (B, 3, H, W) in [-1, 1] -> (B, D), unit norm
    enc.embed_texts(captions)  # list[str] -> (B, D), unit norm

Where no pretrained CLIP is at hand, `EncoderModule` trains the same class from a small preset
contrastively (symmetric InfoNCE with a learnable temperature) on the attacker's auxiliary pool
only (`MembershipDataModule(train_split="auxiliary")`): it never sees the target's data. At the
end of `fit` rank 0 writes a transformers folder (model, tokenizer, preprocessor_config.json,
card.json) that `load_encoder` and `CLIPModel.from_pretrained` both read.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from lightning_mia.card import CARD_KEY, RunCard, resumed_card
from lightning_mia.data.stage import stage_data
from lightning_mia.errors import UserError
from lightning_mia.models.tokenizers import load_clip_tokenizer
from lightning_mia.paths import atomic_write_json, write_model_files
from lightning_mia.registry import Registry
from lightning_mia.stage_module import StageModule

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP image normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's cap on the learned temperature
PREPROCESSOR_FILE = "preprocessor_config.json"
CARD_FILE = "card.json"
ATTACKER_POOLS = ("auxiliary", "public")  # training splits of the attacker's own components


@dataclass(frozen=True)
class EncoderPreset:
    """A CLIP size: ViT image side and patch, width, layers, heads, projection, text length."""

    image_size: int
    patch_size: int
    hidden: int
    layers: int
    heads: int
    dim: int
    text_len: int


PRESETS: Registry[EncoderPreset] = Registry("encoder preset")
# ViT patch 4 on 32x32 (64 patches) and a 2-layer text transformer over characters
PRESETS.register("tiny", EncoderPreset(32, 4, hidden=64, layers=2, heads=2, dim=64, text_len=128))
PRESETS.register(
    "small", EncoderPreset(64, 8, hidden=128, layers=4, heads=4, dim=128, text_len=128)
)


class EncoderError(UserError):
    """A folder that does not hold a usable CLIP model, or an encoder misconfigured."""


def clip_config(preset: str, tokenizer: CLIPTokenizer, image_size: int = 0) -> CLIPConfig:
    """A random-init `CLIPConfig` of a named preset for `tokenizer`'s vocabulary."""
    p = PRESETS[preset]
    size = image_size or p.image_size
    if size % p.patch_size:
        raise EncoderError(f"image_size {size} is not a multiple of patch {p.patch_size}")
    common = dict(
        hidden_size=p.hidden,
        intermediate_size=4 * p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        projection_dim=p.dim,
    )
    text = dict(
        common,
        vocab_size=len(tokenizer),
        max_position_embeddings=p.text_len,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(common, image_size=size, patch_size=p.patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=p.dim)


class ImageTextEncoder(torch.nn.Module):
    """A `CLIPModel` and its tokenizer: unit-norm image and text embeddings in one space."""

    def __init__(
        self,
        model: CLIPModel,
        tokenizer: CLIPTokenizer,
        image_mean: tuple[float, ...] = CLIP_MEAN,
        image_std: tuple[float, ...] = CLIP_STD,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self.image_size = int(model.config.vision_config.image_size)
        self.max_length = min(
            int(tokenizer.model_max_length), int(model.config.text_config.max_position_embeddings)
        )

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP input (B, 3, S, S): resized (square inputs assumed;
        bicubic, antialiased) to the model's image size and normalised with its mean and std."""
        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        return (x.clamp(0, 1) - self.mean) / self.std

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, D) unit-norm image embeddings."""
        out = self.model.vision_model(pixel_values=self.pixel_values(images))
        return F.normalize(self.model.visual_projection(out.pooler_output), dim=-1)

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Padded, truncated token ids and mask on the model's device."""
        enc = self.tokenizer(
            list(captions),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        device = self.mean.device
        return {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": enc["attention_mask"].to(device),
        }

    def embed_texts(self, captions: list[str]) -> torch.Tensor:
        """list of B captions -> (B, D) unit-norm text embeddings."""
        out = self.model.text_model(**self.tokenize(captions))
        return F.normalize(self.model.text_projection(out.pooler_output), dim=-1)

    def save(self, folder: str | os.PathLike, card: RunCard | None = None) -> Path:
        """Write the transformers files (model, tokenizer, preprocessor, card) into `folder`.

        Everything is written to a temporary sibling first, then moved in file by file
        (`os.replace`), `config.json` last: a crash never leaves a folder that loads as a model
        with missing parts, and other files in `folder` (checkpoints, logs) are kept.
        """
        folder = Path(folder)

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            atomic_write_json(tmp / PREPROCESSOR_FILE, self._preprocessor_config())
            if card is not None:
                atomic_write_json(tmp / CARD_FILE, card.to_dict())

        return write_model_files(folder, write)

    def _preprocessor_config(self) -> dict[str, Any]:
        """A `CLIPImageProcessor` config with this encoder's size and normalisation."""
        s = self.image_size
        return {
            "image_processor_type": "CLIPImageProcessor",
            "image_mean": self.mean.flatten().tolist(),
            "image_std": self.std.flatten().tolist(),
            "size": {"shortest_edge": s},
            "crop_size": {"height": s, "width": s},
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "resample": 3,  # bicubic
            "rescale_factor": 1 / 255,
        }


def _normalisation(folder: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Image mean/std from the folder's preprocessor_config.json, else CLIP's."""
    path = folder / PREPROCESSOR_FILE
    if not path.is_file():
        return CLIP_MEAN, CLIP_STD
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise EncoderError(
            f"encoder folder {folder}: {PREPROCESSOR_FILE} is not JSON ({err})"
        ) from err
    mean, std = cfg.get("image_mean", CLIP_MEAN), cfg.get("image_std", CLIP_STD)
    if len(mean) != 3 or len(std) != 3:
        raise EncoderError(f"encoder folder {folder}: image_mean/std in {path.name} need 3 values")
    return tuple(mean), tuple(std)


def _load_tokenizer(path: Path) -> CLIPTokenizer:
    """The folder's CLIP tokenizer (tokenizer.json or vocab.json), else the character-level one."""
    if not any((path / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        return load_clip_tokenizer("")
    try:
        return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - unreadable tokenizer files: one clear error
        raise EncoderError(
            f"encoder folder {path}: cannot load its CLIP tokenizer ({err})"
        ) from err


def load_encoder(folder: str) -> ImageTextEncoder:
    """Load a local transformers CLIP folder (ours or a pretrained one) in eval mode.

    The tokenizer is the folder's (`tokenizer.json`/`vocab.json`), else the character-level one
    (what the tiny presets use), which must fit
    the model's vocabulary. Anything else is one `EncoderError` naming the folder.
    """
    path = Path(folder)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EncoderError(f"encoder folder {path}: no config.json (not a transformers model)")
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as err:
        raise EncoderError(f"encoder folder {path}: config.json is not JSON ({err})") from err
    if model_type != "clip":
        raise EncoderError(
            f"encoder folder {path}: model_type is {model_type!r}, expected 'clip' (a CLIPModel)"
        )
    try:
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - weights missing or not matching: one clear error
        raise EncoderError(f"encoder folder {path}: cannot load the CLIP model ({err})") from err
    tokenizer = _load_tokenizer(path)
    if len(tokenizer) > model.config.text_config.vocab_size:
        raise EncoderError(
            f"encoder folder {path}: tokenizer has {len(tokenizer)} tokens but the model's text "
            f"vocabulary is {model.config.text_config.vocab_size} (wrong or missing vocab.json)"
        )
    mean, std = _normalisation(path)
    return ImageTextEncoder(model, tokenizer, mean, std).eval()


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor) -> tuple:
    """Symmetric InfoNCE of (B, D) unit-norm pairs -> (loss, image-to-text retrieval accuracy)."""
    logits = scale * image_emb @ text_emb.T  # (B, B)
    target = torch.arange(len(logits), device=logits.device)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
    acc = (logits.argmax(dim=1) == target).float().mean()
    return loss, acc


def random_shift(images: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each (B, 3, H, W) image by up to `max_shift` whole pixels, borders replicated."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    shift = torch.randint(-max_shift, max_shift + 1, (b, 2), device=images.device)
    theta = torch.zeros(b, 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, 0, 2] = 2 * shift[:, 0] / w
    theta[:, 1, 2] = 2 * shift[:, 1] / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="border", align_corners=False)


class EncoderModule(StageModule):
    """Trains a small `CLIPModel` contrastively on the attacker's auxiliary image-caption pool."""

    family = "encoder"

    def __init__(
        self,
        preset: str = "tiny",
        image_size: int = 0,
        tokenizer: str = "",
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        max_shift: int = 2,
        output: str = "",
    ) -> None:
        """
        Args:
            preset: model size, a key of `PRESETS` ("tiny": ViT patch 4 on 32x32, 2+2 layers).
            image_size: encoder input size; 0 = the preset's (inputs are resized to it).
            tokenizer: folder of a CLIP tokenizer; "" = the character-level one (no download).
            lr: peak AdamW learning rate (linear warm-up, then cosine decay to 0).
            weight_decay: AdamW weight decay.
            warmup_steps: optimizer steps of linear warm-up.
            max_shift: augmentation, random translation of up to this many pixels (0 = none).
            output: folder to write the trained encoder to; "" = the experiment's `encoder/`.
        """
        super().__init__()
        self.save_hyperparameters()
        tok = load_clip_tokenizer(
            tokenizer, model_max_length=PRESETS[preset].text_len if preset in PRESETS else 77
        )
        self.encoder = ImageTextEncoder(CLIPModel(clip_config(preset, tok, image_size)), tok)
        self.card: RunCard | None = None
        self._output: Path | None = Path(output) if output else None

    def check_train_split(self, train_split: str) -> None:
        """Refuse a training split that is not the attacker's own pool (the CLI asks first,
        before any file is written)."""
        if train_split not in ATTACKER_POOLS:
            raise EncoderError(
                "EncoderModule trains on the attacker's own pool only, never on a model's "
                f"members: set data.train_split to one of {list(ATTACKER_POOLS)} "
                f"(got {train_split!r})"
            )

    def setup(self, stage: str) -> None:
        data = stage_data(self._trainer)
        if stage == "fit" and not self.hparams.output and data is None:
            raise EncoderError(
                "EncoderModule: no output folder; set model.output or train with a "
                "MembershipDataModule (its experiment's encoder/ folder is used)"
            )
        if data is not None:
            self.check_train_split(data.train_split)
        self.card = RunCard(
            family=self.family,
            preset=self.hparams.preset,
            model_index=0,
            role="attacker",
            splits_hash=data.splits_hash if data is not None else "",
            experiment=str(data.layout.root) if data is not None else "",
            tokenizer=self.hparams.tokenizer,
            augmentation={"max_shift": self.hparams.max_shift},
            train_split=data.train_split if data is not None else "",
        )
        self._output = Path(self.hparams.output) if self.hparams.output else None
        if self._output is None and data is not None:
            self._output = data.layout.encoder

    @property
    def output_folder(self) -> Path:
        if self._output is None:
            raise EncoderError("EncoderModule: no output folder (set model.output)")
        return self._output

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        images = random_shift(batch["pixel_values"], self.hparams.max_shift)  # (B, 3, H, W)
        image_emb = self.encoder.embed_images(images)  # (B, D)
        text_emb = self.encoder.embed_texts(list(batch["caption"]))  # (B, D)
        scale = self.encoder.model.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp()
        loss, acc = clip_loss(image_emb, text_emb, scale)
        bs = len(images)
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/retrieval_acc", acc, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", scale, batch_size=bs)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for n, p in self.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in self.named_parameters() if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.98))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = max(min(hp.warmup_steps, total - 1), 0)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (
                1 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1))
            )

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.card is not None:
            checkpoint[CARD_KEY] = self.card.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CARD_KEY in checkpoint:  # resumed by fit on an experiment's data: setup's card stands
            ours = self.card if self.card is not None and self.card.experiment else None
            self.card = resumed_card(RunCard.from_dict(checkpoint[CARD_KEY]), ours)

    def on_fit_end(self) -> None:
        if not self.trainer.is_global_zero:
            return
        folder = self.encoder.save(self.output_folder, card=self.card)
        rank_zero_info(f"attacker encoder written to {folder}")
