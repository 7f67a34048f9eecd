"""The flow family's cost: each gray-box signal against the model's own passes, and batched
generation against the architecture's pipeline (StableDiffusion3Pipeline, FluxPipeline).

    python benchmarks/bench_flow.py [--preset tiny|flux-tiny|sd3-256] [--batch 32] [--threads 2]

Builds a random-init model of the preset (the cost of a trained one is the same) over a random
KL autoencoder. For each signal: seconds per sample of `compute_signals` alone, and the ratio
(queries per sample x one transformer pass over the batch / batch) / (measured seconds per
sample): 1 means the signal costs what its transformer passes cost (the performance issue asks
>= 0.85); `_without_encoders` leaves out the frozen autoencoder and text encoders, which run
once per batch whatever signals are asked (on the tiny preset they cost more than a pass);
`_all_passes` counts every pass of the model the signal asks for: its transformer passes, the
text encoders' pass over every caption it encodes (counted during the run: CLiD encodes one
masked caption per word to rank the words, then its reduced captions) and the autoencoder's.
Then N images for each of the batch's captions, by `generate` and by the pipeline called once
per caption with the same noise. Prints the CPU, kernels and threads first, then
`RESULT <name> <value>` lines.
"""

import argparse
import tempfile
import time

import torch
from _machine import print_machine
from diffusers import AutoencoderKL

from lightning_mia.data.shapes import ShapesSource
from lightning_mia.graybox import SIGNALS, SignalOptions, compute_signals, signals_for
from lightning_mia.graybox.denoiser import LatentView
from lightning_mia.models.base import per_caption_randn
from lightning_mia.models.flow import FlowMatchingModule
from lightning_mia.models.flow_arch import pack
from lightning_mia.models.vae import save_autoencoder

SIZES = {
    "tiny": (32, (32, 64, 64)),
    "flux-tiny": (32, (32, 64, 64)),
    "sd3-256": (256, (128, 256, 512, 512)),
}


def build_model(preset, folder, device):
    res, channels = SIZES[preset]
    n = len(channels)
    ae = AutoencoderKL(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=res,
    )
    save_autoencoder(ae, folder)
    model = FlowMatchingModule(preset=preset, autoencoder=str(folder), resolution=res)
    return model.to(device).eval(), res


def timed(fn, repeats, device):
    fn()  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - start) / repeats


def text_encodings(model, run) -> int:
    """How many captions the model's text encoders encode during `run()` (every call of
    `model.condition`, which every signal's conditioning goes through)."""
    encoded = []
    condition = model.condition
    model.condition = lambda captions: (encoded.append(len(captions)), condition(captions))[1]
    try:
        run()
    finally:
        del model.condition  # the class's method again
    return sum(encoded)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=2, help="N images per caption")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print_machine(args.device)  # CPU, kernels, threads (as every benchmark)
    print(f"# flow {args.preset}, batch {args.batch}")
    with tempfile.TemporaryDirectory() as tmp:
        model, res = build_model(args.preset, f"{tmp}/autoencoder", args.device)
    source = ShapesSource(num_samples=args.batch, resolution=res, seed=1)
    batch = {
        "pixel_values": torch.stack([source.image(i) for i in range(args.batch)]).to(args.device),
        "caption": [source.caption(i) for i in range(args.batch)],
        "sample_id": torch.arange(args.batch),
    }
    with torch.no_grad():
        view = LatentView(model)
        x0, cond = view.latents(batch["pixel_values"]), view.condition(batch["caption"])
        one_pass = timed(lambda: view.predict(x0, 0.5, cond), args.repeats, args.device)
        encode = timed(
            lambda: (view.latents(batch["pixel_values"]), view.condition(batch["caption"])),
            args.repeats,
            args.device,
        )  # the frozen autoencoder and text encoders: once per batch, shared by the signals
        text = timed(lambda: view.condition(batch["caption"]), args.repeats, args.device)
    print(f"RESULT flow_transformer_pass_seconds_per_sample {one_pass / args.batch:.6f}")
    print(f"RESULT flow_encoders_seconds_per_sample {encode / args.batch:.6f}")
    options = SignalOptions()
    for name in signals_for("flow"):
        queries = SIGNALS[name].queries_per_sample(options)
        run = lambda n=name: compute_signals(model, batch, [n], seed=0, options=options)  # noqa: E731
        per_sample = timed(run, args.repeats, args.device) / args.batch
        print(f"RESULT {name}_model_passes_per_sample {queries}")
        print(f"RESULT {name}_seconds_per_sample {per_sample:.6f}")
        model_time = queries * one_pass / args.batch
        print(f"RESULT {name}_model_time_ratio {model_time / per_sample:.3f}")
        ratio = model_time / (per_sample - encode / args.batch)
        print(f"RESULT {name}_model_time_ratio_without_encoders {ratio:.3f}")
        captions = text_encodings(model, run) / args.batch
        every_pass = model_time + captions * text / args.batch + (encode - text) / args.batch
        print(f"RESULT {name}_text_encodings_per_sample {captions:.1f}")
        print(f"RESULT {name}_model_time_ratio_all_passes {every_pass / per_sample:.3f}")
    generation(model, batch["caption"], args)


def generation(model, captions, args):
    """Batched `generate` vs the pipeline once per caption, the same noise (FluxPipeline: packed
    latents, classifier-free guidance as its `true_cfg_scale` with an empty negative prompt)."""
    n, steps = args.images, model.hparams.num_inference_steps
    seeds = list(range(len(captions)))
    ours = timed(lambda: model.generate(captions, n, seeds), 1, args.device)
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    scale, flux = model.hparams.guidance_scale, model.arch.name == "flux"
    guidance = dict(true_cfg_scale=scale, negative_prompt="") if flux else {}

    def per_caption():
        for caption, seed in zip(captions, seeds):
            noise = per_caption_randn([seed], (n, *model.latent_shape), args.device)
            pipe(
                caption,
                num_images_per_prompt=n,
                latents=pack(noise.flatten(0, 1)) if flux else noise.flatten(0, 1),
                num_inference_steps=steps,
                guidance_scale=scale,
                **guidance,
                height=model.resolution,
                width=model.resolution,
                max_sequence_length=model.t5_length,
                output_type="pt",
            )

    theirs = timed(per_caption, 1, args.device)
    images = len(captions) * n
    print(f"RESULT flow_generate_images_per_second {images / ours:.2f}")
    print(f"RESULT flow_pipeline_per_caption_images_per_second {images / theirs:.2f}")
    print(f"RESULT flow_generate_speedup_vs_pipeline {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
