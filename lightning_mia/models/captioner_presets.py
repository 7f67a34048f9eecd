"""The captioner's presets and its offline tokenizer: a random-init BLIP sized by name.

    words = caption_words(training_captions, max_vocab=8000)   # most frequent first
    tokenizer = word_tokenizer(words, model_max_length=40)    # BertTokenizer, nothing downloaded
    model = BlipForConditionalGeneration(blip_config("tiny", tokenizer))

The vocabulary is word level: BERT's normaliser and pre-tokeniser (from `tokenizers`, the same
split `BertTokenizer` makes) over the training captions, counted and ranked deterministically,
so a resumed run rebuilds the very same ids. Real BLIP folders bring their own BERT tokenizer.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tokenizers.normalizers import BertNormalizer
from tokenizers.pre_tokenizers import BertPreTokenizer
from transformers import BertTokenizer, BlipConfig

from lightning_mia.models.captioner import CaptionerError

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BERT's, ids 0..4

PRESETS: dict[str, dict[str, int]] = {
    # ViT patch 4 on 32x32 (64 patches), 2 layers; a 2-layer decoder cross-attending to it
    "tiny": dict(
        image_size=32, patch_size=4, hidden=64, vision_layers=2, text_layers=2, heads=2, text_len=40
    ),
    "small": dict(
        image_size=64,
        patch_size=8,
        hidden=128,
        vision_layers=4,
        text_layers=4,
        heads=4,
        text_len=64,
    ),
}


def caption_words(captions: list[str], max_vocab: int, min_count: int = 1) -> list[str]:
    """The `max_vocab` most frequent words (BERT-normalised, lower case) seen `min_count`+ times;
    ties in alphabetical order, so the same captions always give the same list."""
    normalizer, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: dict[str, int] = {}
    for text in captions:
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return ranked[:max_vocab]


def word_tokenizer(words: list[str], model_max_length: int) -> BertTokenizer:
    """A `BertTokenizer` over BERT's specials and `words` (unknown words -> [UNK])."""
    with tempfile.TemporaryDirectory() as tmp:
        vocab = [*SPECIAL_TOKENS, *[w for w in words if w not in SPECIAL_TOKENS]]
        Path(tmp, "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
        tok = BertTokenizer.from_pretrained(tmp)  # transformers 5 ignores vocab_file=
    tok.model_max_length = model_max_length
    return tok


def blip_config(
    preset: str, tokenizer: BertTokenizer, image_size: int = 0, dropout: float = 0.0
) -> BlipConfig:
    """A random-init `BlipConfig` of a named preset for `tokenizer`'s vocabulary; `dropout` on
    the decoder's hidden states and every attention map.

    The decoder starts from [CLS] (bos) and stops at [SEP], so training and `generate` agree.
    """
    if preset not in PRESETS:
        raise CaptionerError(f"unknown captioner preset {preset!r}; known: {sorted(PRESETS)}")
    p = PRESETS[preset]
    size = image_size or p["image_size"]
    if size % p["patch_size"]:
        raise CaptionerError(f"image_size {size} is not a multiple of patch {p['patch_size']}")
    common = dict(
        hidden_size=p["hidden"], intermediate_size=4 * p["hidden"], num_attention_heads=p["heads"]
    )
    text = dict(
        common,
        num_hidden_layers=p["text_layers"],
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        vocab_size=len(tokenizer),
        encoder_hidden_size=p["hidden"],
        max_position_embeddings=p["text_len"],
        bos_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # BlipVisionConfig's default initializer_range is 1e-10 (meant for loading weights): a random
    # init from it leaves the ViT at ~0 and it barely learns; use BERT's 0.02 as the decoder does
    vision = dict(
        common,
        num_hidden_layers=p["vision_layers"],
        attention_dropout=dropout,
        image_size=size,
        patch_size=p["patch_size"],
        initializer_range=0.02,
    )
    return BlipConfig(text_config=text, vision_config=vision)
