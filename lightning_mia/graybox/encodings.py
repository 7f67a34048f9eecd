"""The frozen autoencoder's encodings of query images, made once per process for every model
that shares the autoencoder.

    x0 = encode_once(model, pixels)    # model.encode_images(pixels), once per autoencoder

An attack queries the target's samples again and again with the same images: the target, each
shadow on row 0 (LiRA's calibration) and each caption control. Every model of an experiment
loads the one frozen autoencoder (`autoencoder/`, or a pipeline folder's `vae`), so each of
those queries would encode the same images again. At the networks' real sizes the encoder is
a third of the loss signal's time at ldm-256 (1.5 UNet passes per image), half of the flow loss
at SD3's 256 px and more than half of seq2seq's NLL at DALL-E mini (`bench_signals.py`).

A hit is the same computation on the same inputs, never an approximation. The key is a hash of
the autoencoder (its config, every parameter and buffer, hashed again whenever one of them was
changed in place, cast, moved or replaced, and what it computes with besides: train mode, the
attention implementation, LoRA scales), its device and a hash of the batch's pixels,
for whole batches only: an encoder's floats depend on the batch it runs in (by ~1e-7 for a KL
encoder on a CPU), and a report must not depend on which query ran first or whether a stage
was resumed. The model checks the images (their resolution) on a hit as well. It keeps the
first batches up to `LIGHTNING_MIA_ENCODING_MEMO_MB` (default 1024; 0 turns it off; another
autoencoder's batches make room first). Hashing the pixels costs ~1 ms per MB of float32
images on one CPU core.

    importance = CAPTION_MEMO.get(model, captions, "what", compute)   # once per conditioning

The same holds for what a signal derives from captions through the conditioning alone: CLiD's
word importances (a text-encoder pass per word of every caption) are made once per batch for
every model whose `conditioning_inputs()` (text encoders, tokenizers, lengths) hash alike: LoRA
fine-tunes of one pipeline and models whose text encoders were not trained; a model that
trained its own text encoder derives its own. The conditionings themselves are not kept: SD3's
are megabytes per caption.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any, TypeVar
from weakref import WeakKeyDictionary

import torch
from torch import nn

from lightning_mia.graybox.spec import SignalError

MEMO_MB = "LIGHTNING_MIA_ENCODING_MEMO_MB"  # 1 GiB: SD's latents (4x64x64) of ~16k images
T = TypeVar("T")
# the digests of tensors (per module) and of tokenizer pipelines, with the state they were made at
_FINGERPRINTS: WeakKeyDictionary[nn.Module, tuple[tuple, str]] = WeakKeyDictionary()
_TOKENIZERS: WeakKeyDictionary[Any, tuple[tuple, str]] = WeakKeyDictionary()


def memo_bytes() -> int:
    """The memo's size from `LIGHTNING_MIA_ENCODING_MEMO_MB` (MB, default 1024)."""
    text = os.environ.get(MEMO_MB, "1024")
    try:
        mb = float(text)
    except ValueError:
        mb = -1.0
    if not mb >= 0:
        raise SignalError(f"{MEMO_MB}={text!r}: give a size in MB, 0 or more (0 turns it off)")
    return int(mb * 2**20)


def _update(digest: Any, tensor: torch.Tensor) -> None:
    """Add a tensor's dtype, shape and bytes to `digest`."""
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy())


def _tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Every parameter and buffer, persistent or not."""
    return chain(module.named_parameters(), module.named_buffers())


def _behaviour(module: nn.Module) -> str:
    """What a module computes with besides its tensors and config: each submodule's train /
    eval mode (dropout), its attention implementation (transformers' `_attn_implementation`,
    a diffusers processor) and its peft adapters' scales and states (active, merged, off)."""
    parts = []
    for name, m in module.named_modules():
        part = [name, m.training, type(getattr(m, "processor", None)).__name__]
        config = getattr(m, "config", None)
        part.append(getattr(config, "_attn_implementation", None))
        if isinstance(getattr(m, "scaling", None), dict):  # a peft LoRA layer
            adapters = ("active_adapters", "merged_adapters", "disable_adapters")
            part += [sorted(m.scaling.items()), *(getattr(m, a, None) for a in adapters)]
        parts.append(part)
    return repr(parts)


def _digest_of(cache: WeakKeyDictionary, obj: Any, state: tuple, write: Callable) -> str:
    """`write(digest)`'s blake2b hex digest for `obj`, made again only when its `state` (what
    would change it: tensor versions, a tokenizer's size and settings) differs from the kept
    one's."""
    known = cache.get(obj)
    if known is None or known[0] != state:
        digest = hashlib.blake2b(digest_size=16)
        write(digest)
        known = cache[obj] = (state, digest.hexdigest())
    return known[1]


def fingerprint(module: nn.Module) -> str:
    """A hash of `module`'s config, tensors and behaviour (`_behaviour`). The tensors are
    hashed again whenever one of them was changed in place (its version counter), cast, moved
    or replaced (its storage)."""
    config = f"{type(module).__qualname__}{getattr(module, 'config', '')}{_behaviour(module)}"
    state = tuple((n, t.dtype, t.device, t.data_ptr(), t._version) for n, t in _tensors(module))

    def write(digest: Any) -> None:
        for name, tensor in _tensors(module):
            digest.update(name.encode())
            _update(digest, tensor)

    tensors = _digest_of(_FINGERPRINTS, module, state, write)
    return hashlib.blake2b(f"{config}{tensors}".encode(), digest_size=16).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of a tokenizer: its whole serialised pipeline (a fast tokenizer's JSON: vocabulary,
    merges, normaliser, special tokens; else every file `save_pretrained` writes) and its
    settings, hashed again when its size (an added token) or a setting changes."""
    settings = tuple(
        str(getattr(tokenizer, name, None))
        for name in ("model_max_length", "padding_side", "truncation_side", "pad_token")
    )
    state = (type(tokenizer).__qualname__, len(tokenizer), *settings)

    def write(digest: Any) -> None:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            digest.update(backend.to_str().encode())
            return
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            for path in sorted(Path(folder).rglob("*")):
                if path.is_file():
                    digest.update(path.name.encode() + path.read_bytes())

    pipeline = _digest_of(_TOKENIZERS, tokenizer, state, write)
    return hashlib.blake2b(f"{state}{pipeline}".encode(), digest_size=16).hexdigest()


def inputs_fingerprint(inputs: dict[str, Any]) -> str:
    """A hash of named inputs: modules by `fingerprint`, tokenizers by `tokenizer_fingerprint`
    (anything with a vocabulary), anything else (None, numbers, names) by its repr."""
    digest = hashlib.blake2b(digest_size=16)
    for name, value in inputs.items():
        if isinstance(value, nn.Module):
            part = fingerprint(value)
        elif hasattr(value, "get_vocab"):
            part = tokenizer_fingerprint(value)
        else:
            part = repr(value)
        digest.update(f"{name}={part};".encode())
    return digest.hexdigest()


class EncodingMemo:
    """Batches' encodings by (autoencoder, its device, pixels): the first ones, up to
    max_bytes (None: `LIGHTNING_MIA_ENCODING_MEMO_MB`, read at the first encoding)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._items: dict[tuple[str, str, str], tuple[torch.Tensor, torch.device]] = {}
        self._bytes = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0

    def encode(
        self,
        autoencoder: nn.Module,
        pixels: torch.Tensor,
        encode: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """`encode(pixels)`, made once per (autoencoder weights, device, pixels)."""
        if self.max_bytes is None:
            self.max_bytes = memo_bytes()
        if self.max_bytes <= 0:
            return encode(pixels)
        digest = hashlib.blake2b(digest_size=16)
        _update(digest, pixels)
        device = str(next(chain(autoencoder.parameters(), [pixels])).device)
        key = (fingerprint(autoencoder), device, digest.hexdigest())
        if key in self._items:
            self.hits += 1
            kept, origin = self._items[key]
            return kept.to(origin, copy=True)
        self.misses += 1
        out = encode(pixels)
        self._keep(key, out)
        return out

    def _keep(self, key: tuple[str, str, str], out: torch.Tensor) -> None:
        """Keep `out` if it fits, making room with other autoencoders' batches (oldest first).
        Not the most recent batches: an attack reads the same images in the same order model
        after model, and a memo smaller than one model's query that kept the latest ones would
        never be hit; the first ones are, by every later model."""
        size = out.numel() * out.element_size()
        for other in [k for k in self._items if k[0] != key[0]]:
            if self._bytes + size <= self.max_bytes:
                break
            old, _ = self._items.pop(other)
            self._bytes -= old.numel() * old.element_size()
        if self._bytes + size <= self.max_bytes:
            self._items[key] = (out.detach().to("cpu", copy=True), out.device)
            self._bytes += size


MEMO = EncodingMemo()


def encode_once(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """`model.encode_images(pixels)` through the process's memo (`MEMO`), the model's check of
    the images (`check_images`: their resolution) made on a hit as well."""
    model.check_images(pixels)
    return MEMO.encode(model.image_autoencoder(), pixels, model.encode_images)


class CaptionMemo:
    """What a signal derives from a batch's captions through the model's conditioning alone
    (CLiD's word importances), by (`inputs_fingerprint` of the model's `conditioning_inputs()`
    and device, the captions, what): kept for the first MAX_BATCHES batches, for every model
    that conditions alike (LoRA fine-tunes of one pipeline, text encoders never trained).
    Whole batches, as the encodings: a text encoder's floats depend on the batch too. Off with
    `LIGHTNING_MIA_ENCODING_MEMO_MB=0`. Each model's text encoders are hashed once per process
    (about 1 ms per MB of weights: seconds for a T5-XXL), whether or not it can share."""

    MAX_BATCHES = 10_000  # of 32 captions: ~30 MB with their keys

    def __init__(self) -> None:
        self._items: dict[tuple[str, tuple[str, ...], str], Any] = {}
        self.hits = 0

    def clear(self) -> None:
        self._items.clear()

    def get(self, model: Any, captions: Sequence[str], what: str, compute: Callable[[], T]) -> T:
        """`compute()`, made once per (conditioning inputs, captions, what)."""
        if memo_bytes() <= 0:
            return compute()
        inputs = {**model.conditioning_inputs(), "device": str(model.device)}
        key = (inputs_fingerprint(inputs), tuple(captions), what)
        if key in self._items:
            self.hits += 1
            return self._items[key]
        value = compute()
        if len(self._items) < self.MAX_BATCHES:
            self._items[key] = value
        return value


CAPTION_MEMO = CaptionMemo()
