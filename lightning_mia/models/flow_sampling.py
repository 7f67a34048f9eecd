"""Batched sampling of the flow family: one Euler loop over captions x images.

    images = sample_images(module, captions, seeds, num_images=4, steps=20, guidance_scale=3.0)

The loop is `StableDiffusion3Pipeline.__call__`'s or `FluxPipeline.__call__`'s (their timesteps,
shift, Euler steps, guidance rule and decoding: `models.flow_arch`), batched over every caption
and image at once: caption i's starting noise comes from its own seed (`per_caption_randn`), so
a caption gives the same images alone or in any batch, and with the same noise the pipeline
gives the same images (`tests/test_flow.py`, `tests/test_flux.py`).
Classifier-free guidance runs when the scale is above 1 (and, for FLUX, the transformer has no
guidance embedding), the null caption's rows and the captions' rows in one transformer pass.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_mia.models.base import per_caption_randn
from lightning_mia.models.latent import NULL_CAPTION, Conditioning
from lightning_mia.models.vae import decode_latents


def guided_condition(module: Any, captions: list[str], n: int, cfg: bool) -> Conditioning:
    """Rows of B captions x N images (caption-major), after B*N null-caption rows when `cfg`."""
    cond = module.condition(captions).repeat_interleave(n)  # (B*N rows)
    if not cfg:
        return cond
    return Conditioning.cat([module.condition([NULL_CAPTION]).repeat(len(cond)), cond])


@torch.no_grad()
def sample_images(
    module: Any, captions: list[str], seeds: list[int], n: int, steps: int, scale: float
) -> torch.Tensor:
    """Images (B, N, 3, H, W) in [-1, 1] of B captions, N each, in one Euler loop.

    `module` is a `FlowMatchingModule` (its architecture, released transformer, text
    encoders, sampler and autoencoder).
    """
    b = len(captions)
    transformer = module.released()["transformer"]
    sampler = module.make_sampler()
    c, h, w = module.latent_shape
    arch = module.arch
    arch.set_timesteps(sampler, steps, transformer, (c, h, w), module.device)
    cfg = arch.uses_cfg(transformer, scale)
    cond = guided_condition(module, captions, n, cfg)
    latents = per_caption_randn(seeds, (n, c, h, w), module.device).flatten(0, 1)  # (B*N, ...)
    for t in sampler.timesteps:
        model_in = torch.cat([latents, latents]) if cfg else latents
        velocity = arch.forward(transformer, model_in, t.expand(model_in.shape[0]), cond, scale)
        velocity = velocity.float()  # (a bf16 transformer: the Euler steps stay float32)
        if cfg:
            v_null, v_caption = velocity.chunk(2)
            velocity = v_null + scale * (v_caption - v_null)
        latents = sampler.step(velocity, t, latents).prev_sample
    vae = module.vae
    images = decode_latents(vae, latents.to(vae.dtype))  # (B*N, 3, H, W)
    return images.float().reshape(b, n, 3, *images.shape[-2:])
