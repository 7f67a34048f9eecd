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
- any other registered family (`--family` lists them): its batched `generate` alone.
Rounds alternate the two; medians are compared. Prints images/s, peak memory (process RSS; CUDA
peak allocated of each method on a GPU),
`RESULT generate_over_per_caption_pipeline <batched images/s / per-caption images/s>` (goal >= 2)
and `RESULT generate_images_per_s` (batched). Then the model's speed (`_forward`):
`RESULT generate_forward_share`, the share of a hooked batched run spent inside the query
network (the UNet, BART), the rest split on a `#` line (text encoder, autoencoder decode, other:
the sampler's Python loop, per-image generators); and, where every call is the same forward
(a diffusion sampler's steps), `RESULT generate_model_over_total`: that forward, replayed as many
times at the same batch (plain attention processors), over the batched run (the median of the
rounds' ratios; 1 = no overhead). seq2seq's KV-cached decoder steps differ call by call: its
model passes are the batched run's own loop made greedy (the encoder once, L decoder steps with
the code head, an argmax in place of the sampler), and `RESULT generate_networks_over_total`
adds the VQ decoder's pass.
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
    measure_peak_cuda,
    peak_rss_mib,
    print_machine,
    shapes_items,
    stopwatch,
)
from _forward import alternate, breakdown, clocked, query_network, uniform_replay
from diffusers import VQModel
from transformers import LogitsProcessor, LogitsProcessorList

from lightning_mia.models.base import caption_seeds
from lightning_mia.models.seq2seq_sampling import autoregressive_codes
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


def generic_runs(model: Any, captions: list[str], args: argparse.Namespace) -> dict:
    """A family with no library pipeline to compare against: its batched `generate` alone."""
    return {"batched": lambda seed: model.generate(captions, args.num_images, seed)}


RUNS = {"diffusion": diffusion_runs, "seq2seq": seq2seq_runs}  # any other family: generic_runs


def report_comparison(args: argparse.Namespace, seconds: dict, peaks: dict, images: dict) -> None:
    """images/s of each run; batched over per caption where there is a per-caption pipeline."""
    count, rate, cpu = args.num_captions * args.num_images, {}, {}
    for name, secs in seconds.items():
        rate[name] = count / statistics.median(wall for wall, _ in secs)
        cpu[name] = statistics.median(c for _, c in secs)
        memory = f", peak CUDA {peaks[name]:.0f} MiB" if args.device == "cuda" else ""
        rounds = ", ".join(f"{t:.2f}" for t, _ in secs)
        print(
            f"{name:12s} {rate[name]:8.2f} images/s  (rounds: {rounds} s; median CPU "
            f"{cpu[name]:.2f} s){memory}"
        )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    print(f"RESULT generate_images_per_s {rate['batched']:.2f}")
    if "per caption" not in seconds:
        return
    print(f"ratio by CPU time {cpu['per caption'] / cpu['batched']:.3f} (robust to other load)")
    batched, single = images["batched"], images["per caption"]
    assert batched.shape == single.shape
    if args.family == "diffusion":  # same noise, same deterministic sampler: same images
        print(f"max |batched - per caption| {(batched - single).abs().max().item():.2e}")
    ratio = rate["batched"] / rate["per caption"]
    print(f"RESULT generate_over_per_caption_pipeline {ratio:.3f}")


def report_model_speed(
    model: Any, run: Callable[[int], Any], args: argparse.Namespace, captions: list[str]
) -> None:
    """Batched `generate` against the query network's own forward passes (`_forward`): the
    share of a hooked run spent inside it, and, when every call of a run is the same forward
    (a diffusion sampler's steps, not a KV-cached decoder's), that forward replayed as many
    times, in rounds alternating with `generate`."""
    network = query_network(model)
    with autocast(args.precision, args.device):
        clock, hooked_s = clocked(model, network, lambda: run(0))
    count = args.num_captions * args.num_images
    calls = len(clock.calls)
    print(
        f"# model speed: {calls} calls of `{network}` ({clock.queries(count):g} rows per image); "
        f"hooked run: {breakdown(clock.seconds, hooked_s, count)} per image"
    )
    print(f"RESULT generate_forward_share {clock.seconds.get(network, 0.0) / hooked_s:.3f}")
    forward = uniform_replay(clock.calls)
    if forward is None and args.family == "seq2seq":
        report_decoder_speed(model, run, args, captions)
        return
    if forward is None:
        print("# its calls differ (a KV cache grows): no replayed-forward ratio")
        return
    with autocast(args.precision, args.device):
        forward()  # warm-up
        times = alternate(
            {"model": lambda: [forward() for _ in range(calls)], "generate": lambda: run(0)},
            args.rounds,
            args.device,
        )
    model, gen = times["model"], times["generate"]
    print(
        f"# {calls} x one `{network}` forward at batch {clock.calls[0].rows}: {model.best:.3f} s "
        f"vs generate {gen.best:.3f} s, best of {args.rounds} rounds (ratio of the best rounds "
        f"{model.best / gen.best:.3f}; by CPU time {model.over(gen, cpu=True):.3f})"
    )
    print(f"RESULT generate_model_over_total {model.over(gen):.3f}")


def report_decoder_speed(
    model: Any, run: Callable[[int], Any], args: argparse.Namespace, captions: list[str]
) -> None:
    """seq2seq, whose KV-cached decoder steps differ call by call: its passes made as the
    batched run makes them, greedy (the encoder once, L decoder steps with the code head, an
    argmax per step in place of the sampler), and those with the VQ decoder's pass after them;
    each over the batched run, in alternated rounds."""
    n, greedy = args.num_images, model.sampling_settings(0, 1.0, 0.0, 1.0)
    spec = model.spec

    def passes() -> torch.Tensor:
        memory, mask = model._encode_for_sampling(captions, n, guided=False)  # as seq2seq_runs
        uniform = torch.zeros(len(captions) * n, spec.image_tokens, device=model.device)
        return autoregressive_codes(model.bart, spec, memory, mask, uniform, greedy)

    def with_decoder() -> torch.Tensor:
        codes = passes()
        return model.decode_images(codes.reshape(len(captions), n, -1))

    with autocast(args.precision, args.device):
        with_decoder()  # warm-up
        runs = {"model": passes, "networks": with_decoder, "generate": lambda: run(0)}
        times = alternate(runs, args.rounds, args.device)
    gen = times["generate"]
    for name, what in (("model", "decoder passes, greedy"), ("networks", "and the VQ decoder")):
        t = times[name]
        print(
            f"# {what}: {t.best:.3f} s vs generate {gen.best:.3f} s, best of {args.rounds} "
            f"rounds (ratio of the best rounds {t.best / gen.best:.3f}; by CPU time "
            f"{t.over(gen, cpu=True):.3f})"
        )
    print(f"RESULT generate_model_over_total {times['model'].over(gen):.3f}")
    print(f"RESULT generate_networks_over_total {times['networks'].over(gen):.3f}")


@torch.no_grad()
def generate_ratio(args: argparse.Namespace) -> None:
    """Batched `generate` images/s, against the per-caption pipeline and the model's passes."""
    with tempfile.TemporaryDirectory() as tmp:
        model, res = build_model(args.family, args.preset, Path(tmp))
    model = model.to(args.device).eval()
    captions = [it["caption"] for it in shapes_items(args.num_captions, res)]
    build_runs = RUNS.get(args.family, generic_runs)
    for run in build_runs(model, captions[:2], args).values():  # warm-up on two captions
        with autocast(args.precision, args.device):
            run(0)
    runs = build_runs(model, captions, args)
    seconds, peaks, images = timed_rounds(runs, args)
    sampler = f", {args.inference_steps} steps, guidance {args.guidance_scale}"
    print(
        f"# {args.family} {args.preset} {res}px, {args.num_captions} captions x "
        f"{args.num_images} images, {args.rounds} rounds, {args.device} {args.precision}, "
        f"{torch.get_num_threads()} threads" + (sampler if args.family == "diffusion" else "")
    )
    report_comparison(args, seconds, peaks, images)
    report_model_speed(model, runs["batched"], args, captions)


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
    print_machine(args.device)
    generate_ratio(args)


if __name__ == "__main__":
    main()
