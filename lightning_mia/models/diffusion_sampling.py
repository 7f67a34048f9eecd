"""Batched sampling of the latent-diffusion family: one denoising loop over captions x images.

    images = sample_images(module, captions, seeds, num_images=4, steps=20, guidance_scale=3.0)

Each caption's starting noise comes from its own seed (`per_caption_randn`), so a caption gives
the same images alone or in any batch; with classifier-free guidance the unconditional and
conditional halves go through the UNet in one pass.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

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
    context = module.encode_text(captions, text_encoder).repeat_interleave(n, 0)  # (B*N, L, D)
    cfg = scale != 1.0
    if cfg:
        empty = module.encode_text([""], text_encoder).expand_as(context)
        context = torch.cat([empty, context])  # (2*B*N, L, D)
    latents = per_caption_randn(seeds, (n, *module.latent_shape), module.device)
    latents = latents.flatten(0, 1) * sampler.init_noise_sigma  # (B*N, C, h, w)
    kwargs = step_kwargs(sampler, seeds, n)
    for t in sampler.timesteps:
        model_in = torch.cat([latents, latents]) if cfg else latents
        model_in = sampler.scale_model_input(model_in, t)
        pred = unet(model_in, t, encoder_hidden_states=context).sample
        if cfg:
            uncond, cond = pred.chunk(2)
            pred = uncond + scale * (cond - uncond)
        latents = sampler.step(pred, t, latents, **kwargs).prev_sample
    vae = module.vae
    images = decode_latents(vae, latents.to(vae.dtype))  # (B*N, 3, H, W)
    return images.float().reshape(b, n, 3, *images.shape[-2:])
