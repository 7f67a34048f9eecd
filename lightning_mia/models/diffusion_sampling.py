"""Batched sampling of the latent-diffusion family: one denoising loop over captions x images.

    images = sample_images(module, captions, seeds, num_images=4, steps=20, guidance_scale=3.0)

Each caption's starting noise comes from its own seed (`per_caption_randn`), so a caption gives
the same images alone or in any batch; with classifier-free guidance the unconditional and
conditional halves go through the UNet in one pass.

The caption context is the same at every step and for every image of a caption (and the empty
caption's for the whole unconditional half), so cross-attention projects its keys and values
once per loop and once per distinct context (`SharedContextAttention`): per step the UNet then
spends nothing on the context, where diffusers' own processors project it again for each image
at each step (with the tiny preset's 128-token captions: 15-20% of a loop's time on CPU). The
sampler's scalar arithmetic runs on host copies of the timesteps: no device sync per step.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from lightning_mia.models.base import per_caption_randn
from lightning_mia.models.vae import decode_latents


def step_kwargs(sampler: SchedulerMixin, seeds: list[int], n: int) -> dict[str, Any]:
    """Per-image generators for stochastic samplers, derived from each caption's seed."""
    if "generator" not in inspect.signature(sampler.step).parameters:
        return {}
    gens = [
        torch.Generator().manual_seed((s * 1_000_003 + 7_919 * (k + 1)) % 2**63)
        for s in seeds
        for k in range(n)
    ]
    return {"generator": gens}


@dataclass
class ContextLayout:
    """Which rows of the UNet's batch attend to which distinct context.

    `full` (rows, L, D) holds every row's context (what the UNet is called with);
    `unique` (G, L, D) holds each distinct context once; `segments` lists (contexts, rows per
    context) in row order, e.g. [(1, B*N), (B, N)]: the empty caption for the B*N unconditional
    rows, then each of B captions for its N images.
    """

    unique: torch.Tensor
    segments: list[tuple[int, int]]
    full: torch.Tensor


def _plain_cross_attention(attn: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether `attn` is the plain kind SharedContextAttention reproduces exactly (as diffusers'
    AttnProcessor2_0 computes it): no norms on q/k/context, no residual, default scale."""
    head_dim = attn.inner_dim // attn.heads
    return (
        hidden.ndim == 3
        and attn.spatial_norm is None
        and attn.group_norm is None
        and not attn.norm_cross
        and attn.norm_q is None
        and attn.norm_k is None
        and not attn.residual_connection
        and abs(attn.scale - head_dim**-0.5) < 1e-12
    )


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention of q (G, Q, C) over k, v (G, L, C) -> (G, Q, C)."""
    g, length, c = q.shape
    q = q.view(g, length, heads, c // heads).transpose(1, 2)  # (G, heads, Q, d)
    k = k.view(g, -1, heads, c // heads).transpose(1, 2)  # (G, heads, L, d)
    v = v.view(g, -1, heads, c // heads).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(g, length, c)


class SharedContextAttention:
    """An attention processor whose cross-attention projects each distinct context once per
    sampling loop; the queries of all rows sharing a context attend to it in one call (softmax
    is per query, so this is the same attention). Anything else goes to the wrapped processor."""

    def __init__(self, base: Any, layout: ContextLayout) -> None:
        self.base, self.layout = base, layout
        self._kv: tuple[torch.Tensor, torch.Tensor] | None = None  # (G, L, C) each

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        layout = self.layout
        if (
            encoder_hidden_states is not layout.full
            or attention_mask is not None
            or not isinstance(self.base, (AttnProcessor, AttnProcessor2_0))
            or not _plain_cross_attention(attn, hidden_states)
        ):
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self._kv is None:
            self._kv = attn.to_k(layout.unique), attn.to_v(layout.unique)
        key, value = self._kv
        query = attn.to_q(hidden_states)  # (rows, Q, C)
        length, c = query.shape[1:]
        parts, row, ctx = [], 0, 0
        for contexts, rows in layout.segments:  # the rows of one context as one long query
            q = query[row : row + contexts * rows].reshape(contexts, rows * length, c)
            k, v = key[ctx : ctx + contexts], value[ctx : ctx + contexts]
            parts.append(_attend(q, k, v, attn.heads).reshape(contexts * rows, length, c))
            row, ctx = row + contexts * rows, ctx + contexts
        out = attn.to_out[1](attn.to_out[0](torch.cat(parts) if len(parts) > 1 else parts[0]))
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def shared_context_attention(unet: nn.Module, layout: ContextLayout) -> Iterator[None]:
    """Install SharedContextAttention on every attention of `unet` for the block, then put the
    original processors back."""
    original = unet.attn_processors
    unet.set_attn_processor({k: SharedContextAttention(p, layout) for k, p in original.items()})
    try:
        yield
    finally:
        unet.set_attn_processor(original)


def caption_context(
    module: Any, captions: list[str], text_encoder: nn.Module, n: int, cfg: bool
) -> ContextLayout:
    """The UNet's text context for B captions x N images (and the empty caption's for the
    unconditional half when `cfg`): (2*B*N or B*N, L, D) rows over B (+1) distinct contexts."""
    b = len(captions)
    unique = module.encode_text(captions, text_encoder)  # (B, L, D)
    segments = [(b, n)]
    if cfg:
        unique = torch.cat([module.encode_text([""], text_encoder), unique])  # (1 + B, L, D)
        segments = [(1, b * n), (b, n)]
    counts = torch.tensor([rows for contexts, rows in segments for _ in range(contexts)])
    index = torch.repeat_interleave(torch.arange(len(counts)), counts)  # context of each row
    full = unique.index_select(0, index.to(unique.device))  # (rows, L, D)
    return ContextLayout(unique=unique, segments=segments, full=full)


@torch.no_grad()
def sample_images(
    module: Any,
    captions: list[str],
    seeds: list[int],
    n: int,
    steps: int,
    scale: float,
) -> torch.Tensor:
    """Images (B, N, 3, H, W) in [-1, 1] of B captions, N each, in one denoising loop.

    `module` is a `LatentDiffusionModule` (its denoiser, sampler, text encoder and autoencoder).
    """
    b = len(captions)
    unet, text_encoder = module.denoiser()
    sampler = module.make_sampler()
    sampler.set_timesteps(steps, device=module.device)
    cfg = scale != 1.0
    layout = caption_context(module, captions, text_encoder, n, cfg)
    latents = per_caption_randn(seeds, (n, *module.latent_shape), module.device)
    latents = latents.flatten(0, 1) * sampler.init_noise_sigma  # (B*N, C, h, w)
    kwargs = step_kwargs(sampler, seeds, n)
    timesteps = sampler.timesteps  # on the device: the UNet's input
    on_host = timesteps.cpu()  # the sampler's scalar arithmetic: no device sync per step
    with shared_context_attention(unet, layout):
        for i, t in enumerate(on_host):
            model_in = torch.cat([latents, latents]) if cfg else latents
            model_in = sampler.scale_model_input(model_in, t)
            pred = unet(model_in, timesteps[i], encoder_hidden_states=layout.full).sample
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + scale * (cond - uncond)
            latents = sampler.step(pred, t, latents, **kwargs).prev_sample
    vae = module.vae
    images = decode_latents(vae, latents.to(vae.dtype))  # (B*N, 3, H, W)
    return images.float().reshape(b, n, 3, *images.shape[-2:])
