"""The captions' token cache (models/tokenizers.py `TokenCache`) pads as the tokenizer pads."""

from __future__ import annotations

import gc
import pickle
from copy import deepcopy

import pytest
import torch

from lightning_mia.models import tokenizers
from lightning_mia.models.bart_tokenizer import load_caption_tokenizer, train_caption_tokenizer
from lightning_mia.models.tokenizers import TokenCache, char_clip_tokenizer

CAPTIONS = ["a red circle", "", "a small blue square at the top left and a circle", "a red circle"]


@pytest.fixture(scope="module")
def bart_bpe(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("bpe")
    train_caption_tokenizer(CAPTIONS * 4, 300, folder)
    return load_caption_tokenizer(folder, 300, max_length=16)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("kind", ["clip", "bart"])
@pytest.mark.parametrize("length", [8, 77])
def test_ids_and_mask_equal_the_tokenizers_own_padding(bart_bpe, kind, side, length) -> None:
    tok = char_clip_tokenizer() if kind == "clip" else bart_bpe
    tok.padding_side = side
    cache = TokenCache()
    for _ in range(2):  # tokenized, then read from the cache
        for padding, to_length in (("longest", False), ("max_length", True)):
            ids, mask = cache.padded(tok, CAPTIONS, length, to_length=to_length)
            own = tok(CAPTIONS, padding=padding, truncation=True, max_length=length)
            assert ids.tolist() == own.input_ids, (padding, side)
            assert mask.tolist() == own.attention_mask, (padding, side)
        assert cache(tok, CAPTIONS, length).tolist() == ids.tolist()


def test_a_replaced_tokenizer_is_not_read_from_the_cache() -> None:
    cache = TokenCache()
    first = char_clip_tokenizer()
    before = cache(first, ["ab"], 6)
    del first
    gc.collect()  # its ids go with it, even if the next object takes its address
    assert len(cache._ids) == 0
    other = char_clip_tokenizer()
    other.add_tokens(["ab"])
    after = cache(other, ["ab"], 6)
    assert after.tolist() == other(["ab"], padding="max_length", max_length=6).input_ids
    assert after.tolist() != before.tolist()


def test_a_tokenizer_changed_after_use_is_tokenized_again() -> None:
    tok, cache = char_clip_tokenizer(), TokenCache()
    before = cache(tok, ["ab", "ba"], 6)
    tok.add_tokens(["ab"])  # one token now
    after = cache(tok, ["ab", "ba"], 6)
    assert after.tolist() == tok(["ab", "ba"], padding="max_length", max_length=6).input_ids
    assert after[0].tolist() != before[0].tolist()
    tok.truncation_side = "left"
    cut = cache(tok, ["abcdefgh"], 4)
    assert cut.tolist() == tok(["abcdefgh"], truncation=True, max_length=4).input_ids


def test_a_full_cache_starts_afresh_and_still_answers(monkeypatch) -> None:
    monkeypatch.setattr(tokenizers, "MAX_CACHED_CAPTIONS", 3)
    tok, cache = char_clip_tokenizer(), TokenCache()
    cache(tok, ["a", "b", "c"], 5)
    ids = cache(tok, ["a", "d"], 5)  # "a" was kept; the cache is emptied to fit "d"
    assert ids.tolist() == tok(["a", "d"], padding="max_length", max_length=5).input_ids


def test_a_pickled_or_copied_cache_starts_empty_and_answers() -> None:
    tok, cache = char_clip_tokenizer(), TokenCache()
    ids = cache(tok, ["a b"], 6)
    for copy in (pickle.loads(pickle.dumps(cache)), deepcopy(cache)):  # ddp_spawn pickles
        assert copy(tok, ["a b"], 6).tolist() == ids.tolist()


def test_no_captions_and_no_padding_token() -> None:
    tok, cache = char_clip_tokenizer(), TokenCache()
    ids, mask = cache.padded(tok, [], 7, to_length=True)
    assert ids.shape == mask.shape == (0, 7) and ids.dtype == torch.long
    tok.pad_token = None
    with pytest.raises(ValueError, match="no padding token"):
        cache(tok, ["a"], 7)
