"""A pretrained BART folder as the text side of the seq2seq family (DALL-E mini's recipe: the
caption encoder starts from BART, the image-code decoder from scratch).

    text_defaults("/models/bart-large", 0, "")                 # (50265, the folder): vocab, BPE
    init_text_side(module.bart, "/models/bart-large", spec)    # encoder + caption embeddings

The folder is what `BartForConditionalGeneration.save_pretrained` writes (config.json and
weights) beside its tokenizer files (vocab.json + merges.txt, the caption tokenizer). Its caption
token embeddings fill rows [0, V) of the unified vocabulary, its encoder (positions, layers, norms)
replaces the random one; the decoder and the image-code rows stay random. Sizes must agree with
the preset (`dalle-mini` is BART-large's: d=1024, 12 encoder layers, 16 heads, ffn 4096).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration

from lightning_mia.models.seq2seq_presets import Seq2SeqError, Seq2SeqPreset

# BartConfig keys the encoder's weights (and what they compute) depend on
ENCODER_KEYS = (
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "activation_function",
    "scale_embedding",
)


def _config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        what = f"pretrained BART folder {folder}: no readable config.json"
        raise Seq2SeqError(f"{what} ({err})") from err
    if config.get("model_type") != "bart":
        raise Seq2SeqError(
            f"pretrained BART folder {folder}: model_type is {config.get('model_type')!r}, "
            "expected 'bart' (a BartForConditionalGeneration / BartModel folder)"
        )
    return config


def text_defaults(folder: str, caption_vocab_size: int, tokenizer: str) -> tuple[int, str]:
    """With a BART folder, what the seq2seq module's 0 / "" mean: its vocabulary size
    (`config.vocab_size`, 50265 for BART-large) and its tokenizer files."""
    if not folder:
        return caption_vocab_size, tokenizer
    return caption_vocab_size or int(_config(folder)["vocab_size"]), tokenizer or folder


def init_text_side(
    bart: BartForConditionalGeneration, folder: str | Path, spec: Seq2SeqPreset
) -> None:
    """Copy a pretrained BART's caption embeddings and encoder into `bart` (in place); nothing
    when `folder` is ""."""
    if not folder:
        return
    config, defaults = _config(folder), BartConfig()
    differ = [
        f"{k} {config.get(k, getattr(defaults, k))!r} (model: {getattr(bart.config, k)!r})"
        for k in ENCODER_KEYS
        if config.get(k, getattr(defaults, k)) != getattr(bart.config, k)
    ]
    if config["vocab_size"] > spec.caption_vocab_size:
        differ.append(
            f"vocab_size {config['vocab_size']} (preset caption vocabulary: "
            f"{spec.caption_vocab_size})"
        )
    if differ:
        raise Seq2SeqError(
            f"pretrained BART folder {folder} does not fit the preset: {'; '.join(differ)}"
        )
    source = BartForConditionalGeneration.from_pretrained(
        str(folder), local_files_only=True, dtype=torch.float32
    ).model
    ours, theirs = bart.model, source
    with torch.no_grad():
        v = config["vocab_size"]
        ours.shared.weight[:v] = theirs.shared.weight[:v]  # tied: encoder input and output rows
        positions = min(
            ours.encoder.embed_positions.weight.shape[0],
            theirs.encoder.embed_positions.weight.shape[0],
        )
        rows = theirs.encoder.embed_positions.weight[:positions]
        ours.encoder.embed_positions.weight[:positions] = rows
    for part in ("layers", "layernorm_embedding"):
        getattr(ours.encoder, part).load_state_dict(getattr(theirs.encoder, part).state_dict())
