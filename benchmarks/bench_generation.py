"""Generation speed of a family module: batched `generate` vs the library pipeline per caption.

    python benchmarks/bench_generation.py --family diffusion            # tiny, CPU, ~1 min
    python benchmarks/bench_generation.py --family seq2seq
    python benchmarks/bench_generation.py --family diffusion --preset ldm-256 --device cuda \
        --precision bf16-mixed --num-captions 32

C captions x N images each, same seeds, same sampler settings:
- diffusion: `LatentDiffusionModule.generate` (all captions x N in one denoising loop, CFG
  batched) against diffusers' `StableDiffusionPipeline` built from the module's parts
  (`module.pipeline()`), called once per caption with `num_images_per_prompt=N`, the same
  scheduler, steps and guidance scale. Both draw caption i's starting noise from the same seeded
  CPU generator, so the two agree image for image (the max difference is printed).
- seq2seq: `Seq2SeqModule.generate` (captions x N sampled together, KV-cached) against one
  caption at a time through transformers' `bart.generate(...)` (plain sampling, the code-range
  restriction as a LogitsProcessor), each followed by the same VQ decoder.
Rounds alternate the two; medians are compared. Prints images/s, peak memory (process RSS; CUDA
peak allocated of each method on a GPU) and
`RESULT generate_over_per_caption_pipeline <batched images/s / per-caption images/s>` (goal >= 2).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_common_args,
    autocast,
    build_model,
    check_args,
    cpu_description,
    measure_peak_cuda,
    peak_rss_mib,
    shapes_items,
    stopwatch,
)
from diffusers import VQModel
from transformers import LogitsProcessor, LogitsProcessorList

from lightning_mia.models.base import caption_seeds
from lightning_mia.models.vae import decode_codes, decode_latents


# --- diffusion: diffusers' StableDiffusionPipeline, once per caption ---------------------------
def diffusion_per_caption(
    model: Any, captions: list[str], n: int, seed: int, steps: int, scale: float
) -> torch.Tensor:
    """Images (C, N, 3, H, W) in [-1, 1] from `model.pipeline()`, one call per caption."""
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    # diffusers passes `generator=` to vae.decode, which VQModel does not take: decode ourselves
    vq = isinstance(model.vae, VQModel)
    out = []
    for caption, s in zip(captions, caption_seeds(len(captions), seed)):
        result = pipe(
            prompt=caption,
            num_images_per_prompt=n,
            num_inference_steps=steps,
            guidance_scale=scale,
            height=model.resolution,
            width=model.resolution,
            generator=torch.Generator().manual_seed(s),  # CPU: the module's noise, too
            output_type="latent" if vq else "pt",
        ).images
        images = decode_latents(model.vae, result) if vq else result * 2 - 1  # (N, 3, H, W)
        out.append(images.float())
    return torch.stack(out)


def diffusion_runs(model: Any, captions: list[str], args: argparse.Namespace) -> dict:
    steps, scale = args.inference_steps, args.guidance_scale
    return {
        "batched": lambda seed: model.generate(
            captions, args.num_images, seed, num_inference_steps=steps, guidance_scale=scale
        ),
        "per caption": lambda seed: diffusion_per_caption(
            model, captions, args.num_images, seed, steps, scale
        ),
    }


# --- seq2seq: transformers' generate, once per caption -----------------------------------------
class CodeRangeLogitsProcessor(LogitsProcessor):
    """Only image codes may be generated: every other logit is -inf."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = torch.full_like(scores, float("-inf"))
        mask[:, self.lo : self.hi] = 0.0
        return scores + mask


def seq2seq_per_caption(model: Any, captions: list[str], n: int, seed: int) -> torch.Tensor:
    """Images (C, N, 3, H, W): transformers' generate per caption, code-range restricted."""
    spec = model.spec
    restrict = LogitsProcessorList(
        [CodeRangeLogitsProcessor(spec.code_offset, spec.image_start_id)]
    )
    images = []
    for caption, s in zip(captions, caption_seeds(len(captions), seed)):
        torch.manual_seed(s)
        ids, mask = model.tokenize([caption])
        out = model.bart.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            num_return_sequences=n,
            max_new_tokens=spec.image_tokens,
            min_new_tokens=spec.image_tokens,
            decoder_start_token_id=spec.image_start_id,
            logits_processor=restrict,
        )
        codes = out[:, 1:] - spec.code_offset  # (N, L)
        assert codes.shape == (n, spec.image_tokens) and codes.min() >= 0
        with torch.autocast(model.device.type, enabled=False):  # as the module decodes
            images.append(decode_codes(model.vq, codes, model.code_grid))
    return torch.stack(images)


def seq2seq_runs(model: Any, captions: list[str], args: argparse.Namespace) -> dict:
    plain = dict(top_k=0, top_p=1.0, temperature=1.0, condition_scale=1.0)  # = transformers'
    return {
        "batched": lambda seed: model.generate(captions, args.num_images, seed, **plain),
        "per caption": lambda seed: seq2seq_per_caption(model, captions, args.num_images, seed),
    }


# --- the measurement -------------------------------------------------------------------------
def timed_rounds(
    runs: dict[str, Callable[[int], torch.Tensor]], args: argparse.Namespace
) -> tuple[dict[str, list[tuple[float, float]]], dict[str, float], dict[str, torch.Tensor]]:
    """(wall, CPU) seconds per round of each run (alternating), their peak CUDA MiB, their
    last images."""
    seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
    peaks: dict[str, float] = {name: 0.0 for name in runs}
    images: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        for name, run in runs.items():
            with stopwatch(args.device) as elapsed, autocast(args.precision, args.device):
                images[name], peak = measure_peak_cuda(lambda run=run, r=r: run(r), args.device)
            seconds[name].append((elapsed[0], elapsed[1]))
            peaks[name] = max(peaks[name], peak)
    return seconds, peaks, images


@torch.no_grad()
def generate_ratio(args: argparse.Namespace) -> float:
    """Batched `generate` images/s over the per-caption pipeline's."""
    with tempfile.TemporaryDirectory() as tmp:
        model, res = build_model(args.family, args.preset, Path(tmp))
    model = model.to(args.device).eval()
    captions = [it["caption"] for it in shapes_items(args.num_captions, res)]
    build_runs = diffusion_runs if args.family == "diffusion" else seq2seq_runs
    for run in build_runs(model, captions[:2], args).values():  # warm-up on two captions
        with autocast(args.precision, args.device):
            run(0)
    seconds, peaks, images = timed_rounds(build_runs(model, captions, args), args)
    count = args.num_captions * args.num_images
    sampler = f", {args.inference_steps} steps, guidance {args.guidance_scale}"
    print(
        f"# {args.family} {args.preset} {res}px, {args.num_captions} captions x "
        f"{args.num_images} images, {args.rounds} rounds, {args.device} {args.precision}, "
        f"{torch.get_num_threads()} threads" + (sampler if args.family == "diffusion" else "")
    )
    print(f"# {cpu_description()}")
    rate, cpu = {}, {}
    for name, secs in seconds.items():
        rate[name] = count / statistics.median(wall for wall, _ in secs)
        cpu[name] = statistics.median(c for _, c in secs)
        memory = f", peak CUDA {peaks[name]:.0f} MiB" if args.device == "cuda" else ""
        rounds = ", ".join(f"{t:.2f}" for t, _ in secs)
        print(
            f"{name:12s} {rate[name]:8.2f} images/s  (rounds: {rounds} s; median CPU "
            f"{cpu[name]:.2f} s){memory}"
        )
    print(f"ratio by CPU time {cpu['per caption'] / cpu['batched']:.3f} (robust to other load)")
    batched, single = images["batched"], images["per caption"]
    assert batched.shape == single.shape == (args.num_captions, args.num_images, 3, res, res)
    if args.family == "diffusion":  # same noise, same deterministic sampler: same images
        print(f"max |batched - per caption| {(batched - single).abs().max().item():.2e}")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    ratio = rate["batched"] / rate["per caption"]
    print(f"RESULT generate_over_per_caption_pipeline {ratio:.3f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--num-captions", type=int, default=16)
    parser.add_argument("--num-images", type=int, default=4, help="N per caption")
    parser.add_argument("--inference-steps", type=int, default=20, help="diffusion only")
    parser.add_argument("--guidance-scale", type=float, default=3.0, help="diffusion only")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    check_args(parser, args)
    generate_ratio(args)


if __name__ == "__main__":
    main()
