"""The caption tokenizer of the seq2seq family: a byte-level BPE trained on the training captions.

    folder = train_caption_tokenizer(captions, 512, "runs/demo/seq2seq-target-000/tokenizer")
    tok = load_caption_tokenizer(folder, max_vocab_size=512)  # a transformers BartTokenizer
    tok = load_caption_tokenizer("/models/bart-large", 50265)  # BART's own 50,265 tokens too

Trained offline with `tokenizers` (nothing is downloaded), written as `vocab.json` +
`merges.txt` (what `BartTokenizer.from_pretrained` reads) and `training.json` (vocabulary size
and a digest of the captions, so a reused folder is checked against the captions it was made
from). The folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tokenizers import ByteLevelBPETokenizer
from transformers import BartTokenizer, PreTrainedTokenizerBase

from lightning_mia.paths import atomic_write_json

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4 when trained here
TRAINING_FILE = "training.json"


def captions_digest(captions: Sequence[str]) -> str:
    """sha256 of the captions as a multiset (order does not matter)."""
    h = hashlib.sha256()
    for caption in sorted(captions):
        h.update(caption.encode("utf-8") + b"\0")
    return h.hexdigest()


def train_caption_tokenizer(
    captions: Sequence[str],
    vocab_size: int,
    folder: str | os.PathLike,
    min_frequency: int = 2,
) -> Path:
    """Train a byte-level BPE of at most `vocab_size` tokens on `captions`; write it to `folder`.

    The vocabulary may come out smaller (captions with few distinct words): the model's
    embedding keeps `vocab_size` rows, the unused ones are never looked up.
    """
    if not captions:
        raise ValueError("cannot train a caption tokenizer on zero captions")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(captions),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.tmp-"))
    try:
        bpe.save_model(str(tmp))
        info = {
            "vocab_size": vocab_size,
            "trained_vocab_size": bpe.get_vocab_size(),
            "num_captions": len(captions),
            "captions_sha256": captions_digest(captions),
        }
        atomic_write_json(tmp / TRAINING_FILE, info)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def check_tokenizer_captions(folder: str | os.PathLike, captions: Sequence[str]) -> None:
    """ValueError when the tokenizer in `folder` was trained on other captions."""
    path = Path(folder) / TRAINING_FILE
    if not path.is_file():
        return  # a tokenizer made elsewhere: nothing recorded to compare
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("captions_sha256") != captions_digest(captions):
        raise ValueError(
            f"caption tokenizer {Path(folder)} was trained on {info.get('num_captions')} other "
            f"captions than the {len(captions)} training captions now: delete the folder to "
            "retrain it, or pass model.tokenizer=<folder> to use it on purpose"
        )


def load_caption_tokenizer(
    folder: str | os.PathLike, max_vocab_size: int, max_length: int = 64
) -> PreTrainedTokenizerBase:
    """`BartTokenizer.from_pretrained(folder)`, checked against the model's caption vocabulary."""
    folder = Path(folder)
    missing = [n for n in ("vocab.json", "merges.txt") if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"caption tokenizer folder {folder}: no {' or '.join(missing)} (a byte-level BPE "
            "folder, as written by train_caption_tokenizer or BartTokenizer.save_pretrained)"
        )
    tok = BartTokenizer.from_pretrained(str(folder), local_files_only=True)
    if len(tok) > max_vocab_size:
        raise ValueError(
            f"caption tokenizer {folder} has {len(tok)} tokens but the model's caption "
            f"vocabulary holds {max_vocab_size}: set caption_vocab_size >= {len(tok)}"
        )
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    # <s> <pad> </s> <unk> are 0..3 in every BART vocabulary; <mask> is 4 in ours and the last
    # id (50264) in BART's own 50,265-token one
    if ids[:4] != [0, 1, 2, 3] or ids[4] in (None, ids[3]):
        raise ValueError(
            f"caption tokenizer {folder}: special tokens {SPECIAL_TOKENS} have ids {ids}, "
            "expected BART's <s> <pad> </s> <unk> at 0..3 and a <mask> token"
        )
    tok.model_max_length = max_length
    return tok
