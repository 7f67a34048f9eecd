"""Named sizes of the seq2seq family (BART over VQGAN codes) and of the VQGANs it reads.

    PRESETS["tiny"]         CPU minutes: BART d=128, 2+2 layers, 64 codes of a 512-code f4 VQ
    PRESETS["dalle-mini"]   DALL-E mini / BART-large size: d=1024, 12+12 layers, 256x256 images,
                            16x16 = 256 codes of the 16384-code f16 VQGAN, caption vocab 50264

The BART vocabulary is unified: caption tokens `[0, V)`, image codes `[V, V + K)`, then the
image-start token `V + K` (the decoder start). `bart_config` builds it; nothing here allocates
weights. `TAMING_VQGAN_CONFIGS` holds taming-transformers model configs for
`python -m lightning_mia.models.taming <ckpt> <name> <out>`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from transformers import BartConfig

from lightning_mia.errors import UserError
from lightning_mia.registry import Registry

# BART's special caption tokens, in BART's id order (the BPE trainer puts them first).
BOS_ID, PAD_ID, EOS_ID = 0, 1, 2


class Seq2SeqError(UserError):
    """A seq2seq model that cannot run as configured (preset, autoencoder, tokenizer, inputs)."""


@dataclass(frozen=True)
class Seq2SeqPreset:
    """Sizes of one seq2seq model; `caption_vocab_size` is padded up to, never down."""

    resolution: int  # image side the VQGAN tokenizes
    image_tokens: int  # codes per image, h * w of the VQGAN grid
    num_codes: int  # VQGAN codebook size K
    caption_vocab_size: int  # caption BPE vocabulary V (specials included)
    max_caption_length: int  # caption tokens kept (BOS and EOS included)
    d_model: int
    encoder_layers: int
    decoder_layers: int
    attention_heads: int
    ffn_dim: int
    dropout: float = 0.0

    @property
    def code_offset(self) -> int:
        """Id of image code 0 in the unified vocabulary."""
        return self.caption_vocab_size

    @property
    def image_start_id(self) -> int:
        """The decoder-start token that precedes the image codes."""
        return self.caption_vocab_size + self.num_codes

    @property
    def vocab_size(self) -> int:
        """Caption tokens + image codes + the image-start token."""
        return self.caption_vocab_size + self.num_codes + 1


PRESETS: Registry[Seq2SeqPreset] = Registry("seq2seq preset")
PRESETS.register(
    "tiny",
    Seq2SeqPreset(
        resolution=32,
        image_tokens=64,  # 8x8 grid of the tiny f4 VQ autoencoder
        num_codes=512,  # AutoencoderModule's default num_vq_embeddings
        caption_vocab_size=512,
        max_caption_length=64,
        d_model=128,
        encoder_layers=2,
        decoder_layers=2,
        attention_heads=4,
        ffn_dim=512,
    ),
)
PRESETS.register(
    "dalle-mini",
    Seq2SeqPreset(
        resolution=256,
        image_tokens=256,  # 16x16 grid of the f16 VQGAN
        num_codes=16384,
        caption_vocab_size=50264,
        max_caption_length=64,
        d_model=1024,
        encoder_layers=12,
        decoder_layers=12,
        attention_heads=16,
        ffn_dim=4096,
    ),
)


def get_preset(
    name: str, caption_vocab_size: int = 0, max_caption_length: int = 0
) -> Seq2SeqPreset:
    """The preset `name`, with the caption vocabulary / length overridden where > 0."""
    preset = PRESETS[name]
    overrides = {}
    if caption_vocab_size > 0:
        overrides["caption_vocab_size"] = caption_vocab_size
    if max_caption_length > 0:
        overrides["max_caption_length"] = max_caption_length
    preset = replace(preset, **overrides)
    if preset.caption_vocab_size < 261:  # 256 byte-level symbols + BART's 5 specials
        raise Seq2SeqError(
            f"caption_vocab_size {preset.caption_vocab_size} is below 261, the smallest "
            "byte-level BPE vocabulary (256 bytes + 5 special tokens)"
        )
    return preset


def bart_config(preset: Seq2SeqPreset) -> BartConfig:
    """A `BartConfig` over the unified vocabulary of `preset` (no weights are built)."""
    return BartConfig(
        vocab_size=preset.vocab_size,
        d_model=preset.d_model,
        encoder_layers=preset.encoder_layers,
        decoder_layers=preset.decoder_layers,
        encoder_attention_heads=preset.attention_heads,
        decoder_attention_heads=preset.attention_heads,
        encoder_ffn_dim=preset.ffn_dim,
        decoder_ffn_dim=preset.ffn_dim,
        # decoder positions: image-start + codes; encoder positions: caption tokens
        max_position_embeddings=max(preset.image_tokens + 1, preset.max_caption_length),
        dropout=preset.dropout,
        attention_dropout=preset.dropout,
        activation_dropout=preset.dropout,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=preset.image_start_id,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        tie_word_embeddings=True,
    )


# taming-transformers `model.params` of VQGANs (the YAML beside a taming checkpoint).
TAMING_VQGAN_CONFIGS: dict[str, dict[str, Any]] = {
    # vqgan_imagenet_f16_16384, the image tokenizer of DALL-E mini: 256x256 -> 16x16 codes
    "dalle-mini": {
        "embed_dim": 256,
        "n_embed": 16384,
        "ddconfig": {
            "double_z": False,
            "z_channels": 256,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 1, 2, 2, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [16],
            "dropout": 0.0,
        },
    },
}
