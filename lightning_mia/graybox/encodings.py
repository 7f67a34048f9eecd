"""The frozen autoencoder's encodings of query images, made once per process for every model
that shares the autoencoder.

    x0 = encode_once(model.image_autoencoder(), pixels, model.encode_images)  # = encode_images

An attack queries the target's samples again and again with the same images: the target, each
shadow on row 0 (LiRA's calibration) and each caption control. Every model of an experiment
loads the one frozen autoencoder (`autoencoder/`, or a pipeline folder's `vae`), so each of
those queries would encode the same images again. At the networks' real sizes the encoder is
a third of the loss signal's time at ldm-256 (1.5 UNet passes per image), half of the flow loss
at SD3's 256 px and more than half of seq2seq's NLL at DALL-E mini (`bench_signals.py`).

A hit is the same computation on the same inputs, never an approximation. The key is a hash of
the autoencoder (its config and every tensor: taken once per module, again when any tensor was
changed in place) and of the batch's pixels, and whole batches only: an encoder's floats
depend on the batch it runs in (by ~1e-7 for a KL encoder on a CPU), and a report must not
depend on which query ran first or whether a stage was resumed. It keeps the first batches up
to `max_bytes` (another autoencoder's make room first): `LIGHTNING_MIA_ENCODING_MEMO_MB`
(default 1024; 0 turns it off).
Hashing the pixels costs ~1 ms per MB of float32 images on one CPU core.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from itertools import chain
from weakref import WeakKeyDictionary

import torch
from torch import nn

# 1 GiB holds the latents of ~16k images at 512 px (SD's 4x64x64), the codes of ~500k
MEMO_BYTES = int(os.environ.get("LIGHTNING_MIA_ENCODING_MEMO_MB", "1024")) * 2**20
_FINGERPRINTS: WeakKeyDictionary[nn.Module, tuple[int, str]] = WeakKeyDictionary()  # tensors


def _update(digest: hashlib.blake2b, tensor: torch.Tensor) -> None:
    """Add a tensor's dtype, shape and bytes to `digest`."""
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    digest.update(flat.view(torch.uint8).numpy())


def _version(module: nn.Module) -> int:
    """The sum of the in-place change counters of the module's tensors."""
    return sum(t._version for t in chain(module.parameters(), module.buffers()))


def fingerprint(module: nn.Module) -> str:
    """A hash of `module`'s config and tensors (the tensors' hashed again only when one of them
    was changed in place)."""
    config = f"{type(module).__qualname__}{getattr(module, 'config', '')}"
    version = _version(module)
    known = _FINGERPRINTS.get(module)
    if known is None or known[0] != version:
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            _update(digest, tensor)
        known = _FINGERPRINTS[module] = (version, digest.hexdigest())
    return hashlib.blake2b(f"{config}{known[1]}".encode(), digest_size=16).hexdigest()


class EncodingMemo:
    """Batches' encodings by (autoencoder, pixels): the first ones, up to max_bytes."""

    def __init__(self, max_bytes: int = MEMO_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: dict[tuple[str, str], torch.Tensor] = {}
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
        """`encode(pixels)`, made once per (autoencoder weights, pixels)."""
        if self.max_bytes <= 0:
            return encode(pixels)
        digest = hashlib.blake2b(digest_size=16)
        _update(digest, pixels)
        key = (fingerprint(autoencoder), digest.hexdigest())
        if key in self._items:
            self.hits += 1
            return self._items[key].to(pixels.device, copy=True)
        self.misses += 1
        out = encode(pixels)
        self._keep(key, out)
        return out

    def _keep(self, key: tuple[str, str], out: torch.Tensor) -> None:
        """Keep `out` if it fits, making room with other autoencoders' batches (oldest first).
        Not the most recent batches: an attack reads the same images in the same order model
        after model, and a memo smaller than one model's query that kept the latest ones would
        never be hit; the first ones are, by every later model."""
        size = out.numel() * out.element_size()
        for other in [k for k in self._items if k[0] != key[0]]:
            if self._bytes + size <= self.max_bytes:
                break
            old = self._items.pop(other)
            self._bytes -= old.numel() * old.element_size()
        if self._bytes + size <= self.max_bytes:
            self._items[key] = out.detach().to("cpu", copy=True)
            self._bytes += size


MEMO = EncodingMemo()


def encode_once(
    autoencoder: nn.Module, pixels: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """`encode(pixels)` through the process's memo (`MEMO`)."""
    return MEMO.encode(autoencoder, pixels, encode)
