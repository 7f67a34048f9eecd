"""DALL-E-mini-style text-to-image: BART predicts the VQGAN codes of an image from its caption.

    python train.py fit --config configs/seq2seq/tiny.yaml                        # target
    python train.py fit --config configs/seq2seq/tiny.yaml --data.model_index 1   # shadow 1

The image tokenizer is the experiment's frozen VQ autoencoder (a diffusers `VQModel` folder, kept
out of the checkpoint); the caption tokenizer is a byte-level BPE that rank 0 trains on the
training captions at fit start and writes to `<run>/tokenizer/` (`pretrained_text`: a BART
folder's tokenizer, encoder and caption embeddings instead). BART reads caption tokens and
writes image codes in one unified vocabulary (`seq2seq_presets`); its output head is restricted
to the code rows, so the model is a distribution over codes only. Each training image is encoded
once and its codes cached by `sample_id` in memory (unless training crops or flips it). Caption
dropout trains the unconditional path that super-conditioning (`condition_scale`) uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import VQModel
from lightning.pytorch.utilities import rank_zero_info
from transformers import BartForConditionalGeneration, PreTrainedTokenizerBase

from lightning_mia.card import CARD_KEY, CheckpointError
from lightning_mia.data.stage import StageData, stage_data
from lightning_mia.models.bart_pretrained import init_text_side, text_defaults
from lightning_mia.models.bart_tokenizer import (
    check_tokenizer_captions,
    load_caption_tokenizer,
    train_caption_tokenizer,
)
from lightning_mia.models.base import (
    TextToImageModule,
    cached_by_id,
    caption_seeds,
    per_caption_rand,
    register_family,
)
from lightning_mia.models.seq2seq_presets import Seq2SeqError, bart_config, get_preset
from lightning_mia.models.seq2seq_sampling import (
    SamplingSettings,
    autoregressive_codes,
    code_logits,
)
from lightning_mia.models.tokenizers import TokenCache
from lightning_mia.models.vae import check_resolution, decode_codes, encode_codes, load_autoencoder

__all__ = ["Seq2SeqError", "Seq2SeqModule"]
# BART's pre-training betas; with beta2 = 0.999 the tiny model stays longer on the shortcut of
# predicting codes from earlier codes alone before it learns to read the caption
ADAM_BETAS = (0.9, 0.98)
ARCHITECTURE_HPARAMS = ("preset", "caption_vocab_size", "max_caption_length")


@register_family("seq2seq")
class Seq2SeqModule(TextToImageModule):
    """BART from caption tokens to VQGAN image codes (DALL-E mini), with batched sampling."""

    frozen_prefix, autoencoder_what = "vq.", "VQGAN image tokenizer"
    sampler_version = "2"  # unfiltered draws over the codes in their own order, not sorted

    def __init__(
        self,
        preset: str = "tiny",
        autoencoder: str = "",
        tokenizer: str = "",
        pretrained_text: str = "",
        caption_vocab_size: int = 0,
        max_caption_length: int = 0,
        caption_dropout: float = 0.1,
        random_crop: bool = False,
        random_flip: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        top_k: int = 0,
        top_p: float = 1.0,
        temperature: float = 1.0,
        condition_scale: float = 1.0,
        cache_codes: bool = True,
        sample_every_n_steps: int = 0,
        num_preview_images: int = 2,
    ) -> None:
        """
        Args:
            preset: model size, "tiny" or "dalle-mini" (see seq2seq_presets.PRESETS).
            autoencoder: diffusers VQModel folder (the image tokenizer); "" = the experiment's
                autoencoder/ folder, found through the datamodule at fit start.
            tokenizer: caption BPE folder to reuse; "" = train one on the training captions
                into <run>/tokenizer/ at fit start (reused on resume), or pretrained_text's.
            pretrained_text: BART folder whose encoder, embeddings, tokenizer start the text side.
            caption_vocab_size: caption vocabulary (BPE trained up to it); 0 = the preset's.
            max_caption_length: caption tokens kept; 0 = the preset's.
            caption_dropout: probability of training on the empty caption (unconditional path).
            random_crop: random resized crop (80-100% side) of each training image.
            random_flip: random horizontal flip of each training image.
            lr: AdamW peak learning rate.
            weight_decay: AdamW weight decay (not on biases and norms).
            warmup_steps: linear learning-rate warm-up, in optimizer steps.
            top_k: sampling default, keep the k most likely codes (0 = off).
            top_p: sampling default, nucleus mass (1 = off).
            temperature: sampling default (0 = greedy).
            condition_scale: sampling default super-conditioning scale (1 = off).
            cache_codes: encode each training image once and keep its codes by sample_id.
            sample_every_n_steps: log a sample grid every this many steps (0 = never).
            num_preview_images: images per preview caption in the sample grid.
        """
        super().__init__(sample_every_n_steps, num_preview_images)
        self.save_hyperparameters()
        vocab, tokenizer = text_defaults(pretrained_text, caption_vocab_size, tokenizer)
        self.spec = get_preset(preset, vocab, max_caption_length)
        self.resolution = self.spec.resolution
        self.sampling = SamplingSettings(top_k, top_p, temperature, condition_scale)
        if not 0.0 <= caption_dropout < 1.0:
            raise Seq2SeqError(f"caption_dropout must be in [0, 1), got {caption_dropout}")
        self.bart = BartForConditionalGeneration(bart_config(self.spec))
        init_text_side(self.bart, pretrained_text, self.spec)  # "" = none: random init
        self.vq: VQModel | None = None  # frozen, kept out of the checkpoint (hooks below)
        self.code_grid = (0, 0)
        self._tokenizer: PreTrainedTokenizerBase | None = None
        self._tokens = TokenCache()
        self._code_cache: dict[int, torch.Tensor] = {}  # sample_id -> (L,) codes, CPU
        if autoencoder:
            self.attach_autoencoder(autoencoder)
        if tokenizer:
            self.attach_tokenizer(tokenizer)

    # --- the frozen parts ------------------------------------------------------------------
    def attach_autoencoder(self, folder: str | Path) -> None:
        """Load the VQ image tokenizer and check it against the preset's code grid."""
        vq = load_autoencoder(folder)
        if not isinstance(vq, VQModel):
            raise Seq2SeqError(
                f"autoencoder {folder} is a {type(vq).__name__}; the seq2seq family needs a "
                "VQModel (discrete codes)"
            )
        spec, name = self.spec, self.hparams.preset
        side = check_resolution(vq, spec.resolution, f"autoencoder {folder}")
        problems = []
        if vq.config.num_vq_embeddings != spec.num_codes:
            problems.append(
                f"its codebook has {vq.config.num_vq_embeddings} codes, preset {name!r} "
                f"expects {spec.num_codes}"
            )
        if side * side != spec.image_tokens:
            problems.append(
                f"it makes {side}x{side} = {side * side} codes per {spec.resolution}px image, "
                f"preset {name!r} expects {spec.image_tokens}"
            )
        if problems:
            raise Seq2SeqError(
                f"autoencoder {folder} does not fit the seq2seq model: {'; '.join(problems)}"
                " (train the autoencoder to match or choose another preset)"
            )
        self.vq = vq.requires_grad_(False).eval().to(self.device)
        self.code_grid = (side, side)
        self.hparams.autoencoder = str(folder)

    def attach_tokenizer(self, folder: str | Path) -> None:
        """Load the caption BPE from `folder` (and record it for the checkpoint)."""
        self._tokenizer = load_caption_tokenizer(
            folder, self.spec.caption_vocab_size, self.spec.max_caption_length
        )
        self.hparams.tokenizer = str(folder)

    @property
    def caption_tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            raise Seq2SeqError(
                "no caption tokenizer: fit the model (it trains one) or pass tokenizer=<folder>"
            )
        return self._tokenizer

    def image_autoencoder(self) -> VQModel:
        """The frozen VQGAN that turns images into codes."""
        if self.vq is None:
            raise Seq2SeqError(
                "no autoencoder: pass autoencoder=<VQModel folder> or fit on an experiment's data"
            )
        return self.vq

    def setup(self, stage: str) -> None:
        data = stage_data(self._trainer)
        if data is not None and data.resolution != self.spec.resolution:
            raise Seq2SeqError(
                f"the data is {data.resolution}px but preset {self.hparams.preset!r} expects "
                f"{self.spec.resolution}px: set data.resolution={self.spec.resolution}"
            )
        if self.vq is None and data is not None:
            self.attach_autoencoder(data.layout.autoencoder)
        if self._tokenizer is None and stage == "fit":
            self._prepare_tokenizer(data)
        super().setup(stage)

    def _prepare_tokenizer(self, data: StageData | None) -> None:
        """Rank 0 trains the BPE into the run folder (unless there from an earlier start)."""
        if data is None:
            raise Seq2SeqError(
                "the seq2seq model trains its caption tokenizer on the training captions of its "
                "stage data: train with a MembershipDataModule or pass "
                "model.tokenizer=<folder of a trained tokenizer>"
            )
        folder = data.layout.run_dir(self.family, data.model_index) / "tokenizer"
        captions = data.training_captions()
        if self.trainer.is_global_zero and not (folder / "vocab.json").is_file():
            train_caption_tokenizer(captions, self.spec.caption_vocab_size, folder)
            rank_zero_info(f"caption tokenizer trained on {len(captions)} captions: {folder}")
        self.trainer.strategy.barrier("seq2seq_tokenizer")
        check_tokenizer_captions(folder, captions)
        self.attach_tokenizer(folder)

    def card_references(self) -> dict[str, str]:
        return {"autoencoder": self.hparams.autoencoder, "tokenizer": self.hparams.tokenizer}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)  # the card: it names a pretrained text side
        if CARD_KEY in checkpoint and self.hparams.pretrained_text:
            checkpoint[CARD_KEY]["text_init"] = self.hparams.pretrained_text

    def train(self, mode: bool = True) -> Seq2SeqModule:
        super().train(mode)
        if self.vq is not None:
            self.vq.eval()  # frozen: never in training mode
        return self

    # --- tokens and codes ------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption ids and attention mask, (B, S) each, padded to the longest caption (each
        caption tokenized once: they repeat every epoch and on every model queried)."""
        ids, mask = self._tokens.padded(
            self.caption_tokenizer, captions, self.spec.max_caption_length
        )
        return ids.to(self.device), mask.to(self.device)

    def check_images(self, pixel_values: torch.Tensor) -> None:
        """Seq2SeqError unless images are (B, 3, R, R) at the preset's resolution R."""
        if tuple(pixel_values.shape[-2:]) != (r := self.spec.resolution,) * 2:
            raise Seq2SeqError(
                f"images are {tuple(pixel_values.shape[-2:])} but preset "
                f"{self.hparams.preset!r} expects {r}x{r}: set data.resolution={r}"
            )

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VQGAN codes (B, L) int64 of images (B, 3, R, R) in [-1, 1]."""
        self.check_images(pixel_values)
        with torch.autocast(self.device.type, enabled=False):  # codes from unrounded distances
            return encode_codes(vq := self.image_autoencoder(), pixel_values.to(vq.dtype))

    def image_codes(self, batch: dict[str, Any]) -> torch.Tensor:
        """Codes (B, L) int64 of the batch's images, encoded once per sample_id and cached
        (not when training crops or flips them)."""
        pixels = batch["pixel_values"]
        if not self.hparams.cache_codes or (self.training and self.augments_images):
            return self.encode_images(pixels)
        dtype = torch.int16 if self.spec.num_codes <= 2**15 else torch.int32
        codes = cached_by_id(
            self._code_cache, batch["sample_id"], lambda r: self.encode_images(pixels[r]), dtype
        )
        return codes.to(self.device, torch.long)

    # --- likelihood ------------------------------------------------------------------------
    def per_token_nll(self, captions: Sequence[str], codes: torch.Tensor) -> torch.Tensor:
        """NLL (B, L) of each image code given the caption and the codes before it."""
        length, k = self.spec.image_tokens, self.spec.num_codes
        if codes.ndim != 2 or codes.shape != (len(captions), length):
            raise Seq2SeqError(
                f"codes must be (B={len(captions)}, L={length}), got {tuple(codes.shape)}"
            )
        if codes.numel() and (codes.min() < 0 or codes.max() >= k):
            raise Seq2SeqError(f"codes must lie in [0, {k}), got [{codes.min()}, {codes.max()}]")
        codes = codes.to(self.device, torch.long)
        input_ids, mask = self.tokenize(captions)
        start = torch.full_like(codes[:, :1], self.spec.image_start_id)
        decoder_input_ids = torch.cat([start, codes[:, :-1] + self.spec.code_offset], dim=1)
        hidden = self.bart.model(
            input_ids=input_ids,
            attention_mask=mask,
            decoder_input_ids=decoder_input_ids,
            use_cache=False,
        ).last_hidden_state  # (B, L, D)
        logits = code_logits(self.bart, self.spec, hidden).float()  # (B, L, K)
        return F.cross_entropy(logits.transpose(1, 2), codes, reduction="none")  # (B, L)

    def per_sample_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean NLL (B,) of the image codes given the caption (teacher forcing)."""
        codes = self.image_codes(batch)
        captions = self.drop_captions(batch["caption"])
        return self.per_token_nll(captions, codes).mean(dim=1)

    # --- sampling --------------------------------------------------------------------------
    def sampling_settings(
        self,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        condition_scale: float | None = None,
    ) -> SamplingSettings:
        """The configured sampler, with the given values overriding it."""
        d = self.sampling
        return SamplingSettings(
            d.top_k if top_k is None else top_k,
            d.top_p if top_p is None else top_p,
            d.temperature if temperature is None else temperature,
            d.condition_scale if condition_scale is None else condition_scale,
        )

    @torch.no_grad()
    def sample_codes(
        self,
        captions: Sequence[str],
        num_images: int = 4,
        seed: int | Sequence[int] = 0,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        condition_scale: float | None = None,
    ) -> torch.Tensor:
        """Image codes (B, N, L) int64 in [0, K), batched over captions x N, KV-cached."""
        settings = self.sampling_settings(top_k, top_p, temperature, condition_scale)
        b, n, length = len(captions), num_images, self.spec.image_tokens
        seeds = caption_seeds(b, seed)
        uniform = per_caption_rand(seeds, (n, length), self.device).reshape(b * n, length)
        memory, memory_mask = self._encode_for_sampling(captions, n, settings.guided)
        codes = autoregressive_codes(self.bart, self.spec, memory, memory_mask, uniform, settings)
        return codes.reshape(b, n, length)

    def _encode_for_sampling(
        self, captions: Sequence[str], n: int, guided: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states once per caption, repeated N times: (R, S, D) and mask (R, S), R =
        B*N, or 2*B*N with the empty caption's states (the unconditional half) after them."""
        b = len(captions)
        ids, mask = self.tokenize(list(captions) + ([""] if guided else []))
        hidden = self.bart.model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        memory = hidden[:b].repeat_interleave(n, dim=0)  # (B*N, S, D)
        memory_mask = mask[:b].repeat_interleave(n, dim=0)
        if guided:
            memory = torch.cat([memory, hidden[b:].expand(b * n, -1, -1)])
            memory_mask = torch.cat([memory_mask, mask[b:].expand(b * n, -1)])
        return memory, memory_mask

    def decode_images(self, codes: torch.Tensor) -> torch.Tensor:
        """Images (B, N, 3, R, R) in [-1, 1] from codes (B, N, L)."""
        (b, n, length), vq = codes.shape, self.image_autoencoder()
        with torch.autocast(self.device.type, enabled=False):
            images = decode_codes(vq, codes.reshape(b * n, length), self.code_grid)
        return images.reshape(b, n, *images.shape[1:])

    @torch.no_grad()
    def generate(
        self,
        captions: list[str],
        num_images: int = 4,
        seed: int | Sequence[int] = 0,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float | None = None,
        condition_scale: float | None = None,
    ) -> torch.Tensor:
        """Images (B, N, 3, R, R) in [-1, 1]; None = the module's configured sampler.

        Caption i's draws come only from its own seed, so a caption gives the same images
        alone or in any batch.
        """
        codes = self.sample_codes(
            captions, num_images, seed, top_k, top_p, temperature, condition_scale
        )
        return self.decode_images(codes)

    # --- training --------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for p in self.bart.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)  # no decay on biases, norms
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
            betas=ADAM_BETAS,
        )
        return self.warmup_schedule(optimizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {})
        differ = [
            f"{k}: checkpoint {saved[k]!r}, model {self.hparams[k]!r}"
            for k in ARCHITECTURE_HPARAMS
            if k in saved and saved[k] != self.hparams[k]
        ]
        if differ:
            raise CheckpointError(f"checkpoint has another architecture ({'; '.join(differ)})")
