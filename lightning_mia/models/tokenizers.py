"""Caption tokenizers that need no download.

`char_clip_tokenizer()` builds a CLIP tokenizer over a character-level vocabulary (the 256
byte-to-unicode characters, the same with CLIP's `</w>` word-end marker, and the two specials,
no merges): every text round-trips exactly and nothing is fetched. Real CLIP vocabularies load
with `CLIPTokenizer.from_pretrained(local_folder)` instead.

`TokenCache` keeps every family's caption token ids: each caption is tokenized once per
tokenizer (captions repeat every epoch, in every signal and on every model of an attack).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any
from weakref import WeakKeyDictionary

import torch
from transformers import CLIPTokenizer

CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"
MAX_CACHED_CAPTIONS = 100_000  # token ids kept per (tokenizer, length) before starting afresh


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


class TokenCache:
    """Captions' token ids, each caption tokenized once per (tokenizer, length) and padded as
    the tokenizer pads (`padding="max_length"` or `"longest"`, on its `padding_side`). Kept per
    tokenizer object, weakly (a replaced tokenizer's ids go with it), and started afresh when
    the tokenizer changes (an added token, another truncation side)."""

    def __init__(self) -> None:
        self._ids: WeakKeyDictionary[Any, tuple[tuple, dict[int, dict[str, torch.Tensor]]]]
        self._ids = WeakKeyDictionary()

    def __getstate__(self) -> dict[str, Any]:
        return {}  # a copy (a spawned process's module, a deepcopy) starts empty

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()

    def rows(self, tokenizer: Any, captions: Sequence[str], length: int) -> list[torch.Tensor]:
        """Each caption's ids (L_i,) int64, special tokens added, truncated at `length`."""
        state = (len(tokenizer), tokenizer.truncation_side)
        if tokenizer not in self._ids or self._ids[tokenizer][0] != state:
            self._ids[tokenizer] = (state, {})
        cache = self._ids[tokenizer][1].setdefault(length, {})
        missing = [c for c in dict.fromkeys(captions) if c not in cache]
        if len(cache) + len(missing) > MAX_CACHED_CAPTIONS:
            cache.clear()
            missing = list(dict.fromkeys(captions))
        if missing:
            ids = tokenizer(missing, truncation=True, max_length=length, add_special_tokens=True)
            cache.update(
                (c, torch.tensor(i, dtype=torch.long)) for c, i in zip(missing, ids.input_ids)
            )
        return [cache[c] for c in captions]

    def __call__(self, tokenizer: Any, captions: Sequence[str], length: int) -> torch.Tensor:
        """Token ids (B, length), padded to and truncated at `length`."""
        return self.padded(tokenizer, captions, length, to_length=True)[0]

    def padded(
        self, tokenizer: Any, captions: Sequence[str], length: int, to_length: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), (B, S) each: truncated at `length` and padded to the longest
        caption (S <= length) or, `to_length`, to `length`."""
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no padding token to pad with")
        rows = self.rows(tokenizer, captions, length)
        width = length if to_length else max((r.numel() for r in rows), default=0)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        left = tokenizer.padding_side == "left"
        for i, row in enumerate(rows):
            span = slice(width - row.numel(), width) if left else slice(0, row.numel())
            ids[i, span], mask[i, span] = row, 1
        return ids, mask
