"""Reduced-precision storage of the weights nothing trains (`frozen_dtype`), as diffusers' LoRA
training scripts keep them (`weight_dtype`: the VAE, the text encoders and the base weights under
LoRA in bf16 or fp16; the trained parameters, their optimizer state and the loss in float32).

    module = FlowMatchingModule(preset="pretrained", pretrained=folder, lora_rank=16,
                                frozen_dtype="bfloat16")   # FLUX.1: transformer 48 -> 24 GB

`FROZEN_DTYPES[frozen_dtype]` is the dtype; `load_dtype(part, frozen, dtype)` is what a folder's
part is read in (so a 12 B transformer is never held in float32); `cast_frozen_weights` stores
each layer whose parameters are all frozen in it after the parts are built (and adapters added).
Every module that calls a part casts its inputs to the part's dtype and returns float32 (the
families' `predict`, `encode_images` and sampling), so losses and gray-box scores are float32
sums of reduced-precision network outputs: a bf16 model's signals are not bitwise the float32
model's (SecMI's t-error, which compares latents that differ by ~1e-3, is the most sensitive).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import cache
from itertools import chain
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

FrozenDtype = Literal["float32", "bfloat16", "float16"]
FROZEN_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def load_dtype(part: str, frozen: Iterable[str], dtype: torch.dtype) -> torch.dtype:
    """The dtype to read a folder's `part` in: `dtype` when its weights stay frozen (a part not
    trained, the base under LoRA), else float32."""
    return dtype if part in set(frozen) else torch.float32


def _kept_in_float32(part: nn.Module, dtype: torch.dtype) -> set[str]:
    """The layer names a part keeps in float32 at `dtype`, as its own from_pretrained does
    (transformers: `_keep_in_fp32_modules` in float16, e.g. T5's `wo`; `..._strict` always)."""
    keep = set(getattr(part, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(part, "_keep_in_fp32_modules", None) or ())
    return keep


def cast_frozen_weights(parts: Iterable[nn.Module | None], dtype: torch.dtype) -> None:
    """Store in `dtype` the floating parameters and buffers of every layer of `parts` whose own
    parameters are all frozen (a layer with none of its own, as SD3's patch embedding that holds
    the position table: all of its children's), except the layers a part keeps in float32; every
    trainable parameter in float32 (a LoRA adapter added to a base read in bf16 is made in bf16,
    as diffusers' scripts find: their `cast_training_params`). None: no part."""
    for part in (p for p in parts if p is not None):
        keep = _kept_in_float32(part, dtype)
        for name, layer in part.named_modules():
            own = [p for p in layer.parameters(recurse=False) if p.is_floating_point()]
            trained = any(p.requires_grad for p in (own or layer.parameters()))
            to = torch.float32 if trained or keep & set(name.split(".")) else dtype
            for p in own:
                p.data = p.data.to(torch.float32 if p.requires_grad else to)
            if to == torch.float32:
                continue
            for key, buffer in layer.named_buffers(recurse=False):
                if buffer is not None and buffer.is_floating_point():
                    layer._buffers[key] = buffer.to(to)


@cache
def cpu_flash_attention_runs(dtype: torch.dtype) -> bool:
    """Whether PyTorch's CPU flash-attention kernel runs in `dtype` in this process. PyTorch 2.13's
    bf16 kernel packs its operands for AMX whenever the hardware has AMX, even when ATen
    dispatches to its AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2` on a Xeon with AVX-512 and AMX),
    and then fails ("pack_vnni2 is only supported when avx512 is supported") on any sequence
    longer than a few tokens."""
    q = torch.zeros(1, 2, 64, 32, dtype=dtype)
    try:
        F.scaled_dot_product_attention(q, q, q)
    except RuntimeError:
        return False
    return True


def usable_cpu_attention(dtype: torch.dtype) -> None:
    """Where the CPU flash-attention kernel fails in `dtype` (`cpu_flash_attention_runs`), turn
    it off for the process, once: attention then runs PyTorch's math kernel, which gives the same
    values in every dtype. Elsewhere (float32; bf16 under AVX-512 kernels or without AMX) this
    changes nothing. The switch is PyTorch's one flash flag, so on a GPU host with that CPU and
    that setting, CUDA attention uses its memory-efficient kernel instead of flash."""
    if dtype == torch.float32 or cpu_flash_attention_runs(dtype):
        return
    if torch.backends.cuda.flash_sdp_enabled():
        torch.backends.cuda.enable_flash_sdp(False)
        log.warning(
            "PyTorch's CPU flash attention fails in %s with %s kernels on this CPU: "
            "attention uses the math kernel in this process",
            dtype,
            torch.backends.cpu.get_cpu_capability(),
        )


@contextmanager
def held_in_float32(parts: Iterable[object]) -> Iterator[None]:
    """Every floating parameter and buffer of the `nn.Module`s among `parts` in float32 inside
    (what a saved pipeline folder holds, so that a plain `from_pretrained` runs it), back to its
    dtype after (bf16 -> float32 -> bf16 is exact)."""
    held = []
    for part in (p for p in parts if isinstance(p, nn.Module)):
        for tensor in chain(part.parameters(), part.buffers()):
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                held.append((tensor, tensor.dtype))
                tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in held:
            tensor.data = tensor.data.to(dtype)
