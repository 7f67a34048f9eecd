"""Batched sampling of the flow family: one Euler loop over captions x images.

    images = sample_images(module, captions, seeds, num_images=4, steps=20, guidance_scale=3.0)

The loop is `StableDiffusion3Pipeline.__call__`'s (its timesteps, shift, Euler steps, guidance
rule and decoding), batched over every caption and image at once: caption i's starting noise
comes from its own seed (`per_caption_randn`), so a caption gives the same images alone or in
any batch, and with the same noise the pipeline gives the same images (`tests/test_flow.py`).
Classifier-free guidance runs when the scale is above 1, as in the pipeline, the null caption's
rows and the captions' rows in one transformer pass.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from lightning_mia.models.base import per_caption_randn
from lightning_mia.models.latent import NULL_CAPTION, Conditioning
from lightning_mia.models.vae import decode_latents


def set_sampling_timesteps(
    sampler: SchedulerMixin, steps: int, image_tokens: int, device: Any
) -> None:
    """`sampler.set_timesteps` as the SD3 pipeline calls it: with dynamic shifting (FLUX-style
    configs), mu from the number of image tokens (`calculate_shift`)."""
    config = sampler.config
    kwargs = {}
    if config.get("use_dynamic_shifting", False):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
        )

        kwargs["mu"] = calculate_shift(
            image_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    sampler.set_timesteps(steps, device=device, **kwargs)


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

    `module` is a `FlowMatchingModule` (its released transformer, text encoders, sampler and
    autoencoder).
    """
    b = len(captions)
    transformer = module.released()["transformer"]
    sampler = module.make_sampler()
    c, h, w = module.latent_shape
    patch = transformer.config.patch_size
    set_sampling_timesteps(sampler, steps, (h // patch) * (w // patch), module.device)
    cfg = scale > 1.0
    seq, pooled = guided_condition(module, captions, n, cfg).parts
    latents = per_caption_randn(seeds, (n, c, h, w), module.device).flatten(0, 1)  # (B*N, ...)
    dtype = transformer.dtype
    seq, pooled = seq.to(dtype), pooled.to(dtype)
    for t in sampler.timesteps:
        model_in = torch.cat([latents, latents]) if cfg else latents
        velocity = transformer(
            hidden_states=model_in.to(dtype),
            timestep=t.expand(model_in.shape[0]),
            encoder_hidden_states=seq,
            pooled_projections=pooled,
        ).sample
        if cfg:
            uncond, cond = velocity.chunk(2)
            velocity = uncond + scale * (cond - uncond)
        latents = sampler.step(velocity, t, latents).prev_sample
    vae = module.vae
    images = decode_latents(vae, latents.to(vae.dtype))  # (B*N, 3, H, W)
    return images.float().reshape(b, n, 3, *images.shape[-2:])
