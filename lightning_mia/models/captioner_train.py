"""The attacker's own captioner (the image-only threat model): a small BLIP trained here.

    python train.py fit --config configs/captioner/tiny.yaml     # on the attacker's pool
    python train.py fit --config configs/captioner/tiny.yaml --trainer.max_steps 100  # weaker
    Captioner("runs/demo/captioner").caption(images)             # then, like any BLIP folder

`CaptionerModule` trains a random-init transformers `BlipForConditionalGeneration` (ViT image
encoder, BERT-style decoder cross-attending to it) with the captioning loss, on the attacker's own
pool only (`data.train_split` public, or auxiliary, as the encoder's stage; a model's members are
refused). Its tokenizer is a word-level `BertTokenizer` whose vocabulary is counted from the
training captions at fit start (`captioner_presets.py`; nothing is downloaded), so model and
tokenizer are built in `setup`, once the data is known.

A seeded part of the pool (`holdout_fraction`, chosen by a hash of seed and sample id, so every
rank and every resume agrees) is never trained on: at the end of training the held-out images
are captioned greedily and scored (`CaptionQuality`: BLEU-4, and on shapes data the share of
captions naming the right shapes and colours), logged as `val/*` and printed. The held-out
images are those of the first epoch this process runs (kept as uint8, at most `holdout_max`).
Rank 0 then writes a transformers folder (model, tokenizer, preprocessor_config.json, card.json
with the experiment, splits hash, pool and quality) that `Captioner(folder)` loads like a real
BLIP.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from transformers import (
    BertTokenizer,
    BlipForConditionalGeneration,
    get_cosine_schedule_with_warmup,
)

from lightning_mia.card import CARD_KEY, RunCard
from lightning_mia.data.stage import stage_data
from lightning_mia.features.caption_quality import CaptionQuality
from lightning_mia.models.captioner import (
    ATTACKER_POOLS,
    CARD_FILE,
    PREPROCESSOR_FILE,
    CaptionerError,
    blip_pixel_values,
    blip_preprocessor_config,
    greedy_captions,
)
from lightning_mia.models.captioner_presets import (
    PRESETS,
    blip_config,
    caption_words,
    word_tokenizer,
)
from lightning_mia.models.encoder import CLIP_MEAN, CLIP_STD, random_shift
from lightning_mia.paths import ExperimentLayout, StagePaths, atomic_write_json, write_model_files
from lightning_mia.stage_module import StageModule

VOCAB_KEY = "captioner_vocab"  # checkpoint entry: the word list (checked on resume)
IGNORE_INDEX = -100  # label of padding and held-out rows (cross-entropy skips it)


def held_out_mask(sample_ids: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """(B,) bool: whether each sample id is in the seeded held-out part (a stable hash < fraction).

    The same on every rank, every epoch and every resume, whatever the batch order.
    """

    def unit(sid: int) -> float:
        digest = hashlib.blake2b(f"{seed}:{sid}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64

    return torch.tensor([unit(int(s)) < fraction for s in sample_ids.tolist()], dtype=torch.bool)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> uint8 on the CPU (what the held-out buffer keeps)."""
    return ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu()


class CaptionerModule(StageModule):
    """Trains a small `BlipForConditionalGeneration` on the attacker's own image-caption pool."""

    family = "captioner"

    def __init__(
        self,
        preset: str = "tiny",
        image_size: int = 0,
        tokenizer: str = "",
        max_vocab: int = 8000,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 50,
        label_smoothing: float = 0.0,
        dropout: float = 0.0,
        max_shift: int = 0,
        holdout_fraction: float = 0.1,
        holdout_max: int = 512,
        seed: int = 0,
        max_new_tokens: int = 40,
        eval_batch_size: int = 128,
        output: str = "",
    ) -> None:
        """
        Args:
            preset: model size, a key of `PRESETS` ("tiny": ViT patch 4 on 32x32, 2+2 layers).
            image_size: captioner input size; 0 = the preset's (inputs are resized to it).
            tokenizer: folder of a BERT tokenizer; "" = a word-level one from the training captions.
            max_vocab: most words the built vocabulary keeps (the rest become [UNK]).
            lr: peak AdamW learning rate (linear warm-up, then cosine decay to 0).
            weight_decay: AdamW weight decay of the weight matrices.
            warmup_steps: optimizer steps of linear warm-up.
            label_smoothing: label smoothing of the captioning cross-entropy (BLIP used 0.1).
            dropout: dropout of the decoder's hidden states and of every attention map.
            max_shift: augmentation, random translation of up to this many pixels (0 = none).
            holdout_fraction: seeded share of the pool never trained on, for caption quality.
            holdout_max: most held-out images kept in memory for scoring (per rank).
            seed: seed of the held-out choice.
            max_new_tokens: longest caption, in tokens, when scoring.
            eval_batch_size: images captioned at once when scoring.
            output: folder to write the captioner to; "" = the experiment's `captioner/`.
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < holdout_fraction < 1.0:
            raise CaptionerError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        if preset not in PRESETS:
            raise CaptionerError(f"unknown captioner preset {preset!r}; known: {sorted(PRESETS)}")
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.model: BlipForConditionalGeneration | None = None  # built in setup (needs the data)
        self.tokenizer: BertTokenizer | None = None
        self.card: RunCard | None = None
        self.held: dict[int, tuple[torch.Tensor, str]] = {}  # sample id -> (uint8 image, caption)
        self.held_complete = False  # one full epoch seen: the buffer holds its final samples
        self.quality: dict[str, float] | None = None

    # ---- set-up: data facts, tokenizer, model ----
    def stage_paths(self, layout: ExperimentLayout, model_index: int = 0) -> StagePaths:
        """The stage's folder (checkpoints, DONE marker, logs): the folder it writes the
        captioner to, so a second one (`model.output`, e.g. fewer steps) is its own stage."""
        folder = Path(self.hparams.output) if self.hparams.output else layout.captioner
        return StagePaths(folder, folder.name, "attacker")

    def check_train_split(self, train_split: str) -> None:
        """Refuse a training split that is not the attacker's own pool (the CLI asks first)."""
        if train_split not in ATTACKER_POOLS:
            raise CaptionerError(
                "CaptionerModule trains on the attacker's own pool only (data.train_split "
                f"{' or '.join(ATTACKER_POOLS)}), never on a model's members: got "
                f"data.train_split={train_split!r}"
            )

    def setup(self, stage: str) -> None:
        data = stage_data(self.trainer)
        hp = self.hparams
        if data is not None:
            self.check_train_split(data.train_split)
        if data is None and (not hp.output or not hp.tokenizer):
            raise CaptionerError(
                "CaptionerModule: without a MembershipDataModule set both model.output (where "
                "to write) and model.tokenizer (a BERT tokenizer folder)"
            )
        if self.model is None:
            self.tokenizer = self._build_tokenizer(data)
            self.model = BlipForConditionalGeneration(
                blip_config(hp.preset, self.tokenizer, hp.image_size, hp.dropout)
            )
        self.image_size = int(self.model.config.vision_config.image_size)
        self.output_folder = Path(hp.output) if hp.output else data.layout.captioner
        self.card = RunCard(
            family=self.family,
            preset=hp.preset,
            model_index=0,
            role="attacker",
            splits_hash=data.splits_hash if data is not None else "",
            experiment=str(data.layout.root) if data is not None else "",
            tokenizer=hp.tokenizer,
            augmentation={"max_shift": hp.max_shift},
            train_split=data.train_split if data is not None else "",
            holdout={"fraction": hp.holdout_fraction, "seed": hp.seed},
        )

    def _build_tokenizer(self, data: Any) -> BertTokenizer:
        text_len = PRESETS[self.hparams.preset]["text_len"]
        if self.hparams.tokenizer:
            try:
                tok = BertTokenizer.from_pretrained(self.hparams.tokenizer, local_files_only=True)
            except Exception as err:  # noqa: BLE001 - unreadable tokenizer folder: one line
                raise CaptionerError(
                    f"captioner tokenizer {self.hparams.tokenizer}: cannot load a BERT tokenizer "
                    f"({err})"
                ) from err
            tok.model_max_length = text_len
            return tok
        words = caption_words(data.training_captions(), self.hparams.max_vocab)
        return word_tokenizer(words, text_len)

    # ---- training ----
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> BLIP input (B, 3, S, S), as `Captioner` prepares it."""
        return blip_pixel_values(images, self.image_size, self.mean, self.std)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        held = held_out_mask(batch["sample_id"], self.hparams.holdout_fraction, self.hparams.seed)
        self._remember(batch, held)
        images = random_shift(batch["pixel_values"], self.hparams.max_shift)  # (B, 3, H, W)
        enc = self.tokenizer(
            list(batch["caption"]), padding=True, truncation=True, return_tensors="pt"
        )
        ids = enc["input_ids"].to(self.device)  # (B, T): [CLS] words [SEP] [PAD]...
        mask = enc["attention_mask"].to(self.device)  # (B, T)
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        labels[held.to(self.device)] = IGNORE_INDEX  # held-out rows add nothing to the loss
        out = self.model(pixel_values=self.pixel_values(images), input_ids=ids, attention_mask=mask)
        logits = out.logits[:, :-1].float()  # (B, T-1, V): token t+1 predicted at t
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            label_smoothing=self.hparams.label_smoothing,
            reduction="sum",
        ) / (labels[:, 1:] != IGNORE_INDEX).sum().clamp(min=1)  # 0, not NaN, if all held out
        n = int((~held).sum())
        self.log("train/loss", loss, prog_bar=True, batch_size=max(n, 1))
        return loss

    def _remember(self, batch: dict[str, Any], held: torch.Tensor) -> None:
        """Keep the held-out samples of the first epoch this process runs, up to holdout_max."""
        if self.held_complete:
            return
        for i in torch.nonzero(held).flatten().tolist():
            sid = int(batch["sample_id"][i])
            if len(self.held) < self.hparams.holdout_max and sid not in self.held:
                self.held[sid] = (to_uint8(batch["pixel_values"][i]), batch["caption"][i])

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=hp.lr, betas=(0.9, 0.98))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = get_cosine_schedule_with_warmup(opt, min(hp.warmup_steps, total - 1), total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- held-out caption quality ----
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Caption the held-out images greedily; BLEU-4 and shapes scores over every rank."""
        was_training = self.model.training
        self.model.eval()
        quality = CaptionQuality().to(self.device)
        ids = sorted(self.held)
        step = self.hparams.eval_batch_size
        for start in range(0, len(ids), step):
            chunk = [self.held[i] for i in ids[start : start + step]]
            images = torch.stack([img for img, _ in chunk]).to(self.device)  # (b, 3, H, W)
            images = images.float().div(127.5).sub(1.0)
            preds = greedy_captions(
                self.model, self.tokenizer, self.pixel_values(images), self.hparams.max_new_tokens
            )
            quality.update(preds, [cap for _, cap in chunk])
        count = torch.tensor(float(len(ids)), device=self.device)
        out = {k: float(v) for k, v in quality.compute().items()}  # gathered over ranks
        out["num_captions"] = float(self.trainer.strategy.reduce(count, reduce_op="sum"))
        self.model.train(was_training)
        return out

    def _training_ends(self) -> bool:
        t = self.trainer
        if t.max_steps is not None and 0 <= t.max_steps <= t.global_step:
            return True
        if t.max_epochs is not None and 0 <= t.max_epochs <= t.current_epoch + 1:
            return True
        return bool(t.should_stop)

    def on_train_epoch_end(self) -> None:
        self.held_complete = True
        if not self._training_ends():
            return
        self.quality = self.evaluate()
        for name, value in self.quality.items():
            self.log(f"val/{name}", value, rank_zero_only=True)

    # ---- checkpoints and the folder ----
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.card is not None:
            checkpoint[CARD_KEY] = self.card.to_dict()
        checkpoint[VOCAB_KEY] = self._vocabulary()

    def _vocabulary(self) -> list[str]:
        return list(self.tokenizer.convert_ids_to_tokens(range(len(self.tokenizer))))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        vocab = checkpoint.get(VOCAB_KEY)
        if vocab is not None and list(vocab) != self._vocabulary():
            raise CaptionerError(
                "captioner checkpoint: its vocabulary differs from the one the training captions "
                "give now (another experiment or pool); resume only on the data it was trained on"
            )

    def on_fit_end(self) -> None:
        if self.quality is None:  # training ended outside an epoch end (e.g. no full epoch)
            self.quality = self.evaluate()
        if not self.trainer.is_global_zero:
            return
        self.card.quality, self.card.train_steps = self.quality, int(self.trainer.global_step)
        folder = write_model_files(self.output_folder, self._write)
        q = self.quality
        shapes = (
            f"; shapes captions with the right shapes and colours {q['shapes_colours']:.3f}, "
            f"every object right {q['exact']:.3f}, right colours {q['colours']:.3f}, right "
            f"object count {q['count']:.3f}"
            if "shapes_colours" in q
            else ""
        )
        rank_zero_info(
            f"captioner held-out quality ({int(q['num_captions'])} captions): "
            f"BLEU-4 {q['bleu']:.3f}{shapes}"
        )
        rank_zero_info(f"attacker captioner written to {folder}")

    def _write(self, tmp: Path) -> None:
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        atomic_write_json(
            tmp / PREPROCESSOR_FILE,
            blip_preprocessor_config(self.image_size, CLIP_MEAN, CLIP_STD),
        )
        atomic_write_json(tmp / CARD_FILE, self.card.to_dict())
