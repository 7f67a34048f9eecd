"""Caption tokenizers that need no download.

`char_clip_tokenizer()` builds a CLIP tokenizer over a character-level vocabulary (the 256
byte-to-unicode characters, the same with CLIP's `</w>` word-end marker, and the two specials,
no merges): every text round-trips exactly and nothing is fetched. Real CLIP vocabularies load
with `CLIPTokenizer.from_pretrained(local_folder)` instead.
"""

from __future__ import annotations

from pathlib import Path

from transformers import CLIPTokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def char_clip_vocab() -> dict[str, int]:
    """Character-level CLIP vocabulary: 256 characters, 256 `char</w>`, BOS, EOS (514 ids)."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [CLIP_BOS, CLIP_EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def char_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer over the character-level vocabulary, built in memory."""
    tok = CLIPTokenizer(vocab=char_clip_vocab(), merges=[])
    tok.model_max_length = model_max_length
    return tok


def load_clip_tokenizer(folder: str = "", model_max_length: int = 77) -> CLIPTokenizer:
    """`CLIPTokenizer.from_pretrained(folder)` or, with no folder, the character-level one."""
    if not folder:
        return char_clip_tokenizer(model_max_length)
    path = Path(folder)
    # vocab.json + merges.txt (CLIP's release) or tokenizer.json (what transformers 5 saves)
    if not any((path / name).is_file() for name in ("vocab.json", "tokenizer.json")):
        raise FileNotFoundError(
            f"tokenizer folder {path}: no vocab.json or tokenizer.json (not a CLIP tokenizer)"
        )
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
