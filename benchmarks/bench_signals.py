"""Gray-box signal cost: seconds per sample for every signal of a family.

    python benchmarks/bench_signals.py --family diffusion [--preset tiny] [--device cuda]
    python benchmarks/bench_signals.py --family seq2seq [--preset tiny] [--batch 32]

Builds a random-init model of the preset (the cost of a trained one is the same) with a random
VQ autoencoder in a temporary folder, and times `compute_signals` for each signal alone on one
batch (default options: timesteps 100/200/300, SecMI t=100 in 10 steps). Prints
`RESULT <signal>_seconds_per_sample <value>` lines (and the model passes per sample).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from diffusers import VQModel

from lightning_mia.graybox import SIGNALS, SignalOptions, compute_signals, signals_for

# preset -> (resolution, VQ block channels (f = 2^(n-1)), latent channels, codebook size)
AUTOENCODERS = {
    ("diffusion", "tiny"): (32, (32, 64, 64), 4, 512),
    ("diffusion", "ldm-256"): (256, (128, 256, 512), 3, 8192),  # f4: 64x64x3 latents
    ("seq2seq", "tiny"): (32, (32, 64, 64), 8, 512),
    ("seq2seq", "dalle-mini"): (256, (32, 32, 64, 64, 128), 8, 16384),  # f16: 16x16 codes
}


def random_autoencoder(family, preset, folder):
    res, channels, latent, codes = AUTOENCODERS[(family, preset)]
    n = len(channels)
    VQModel(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        latent_channels=latent,
        num_vq_embeddings=codes,
        vq_embed_dim=latent,
        norm_num_groups=16,
        sample_size=res,
        mid_block_add_attention=False,
    ).save_pretrained(folder)
    return res


def build_model(family, preset, root):
    res = random_autoencoder(family, preset, root / "autoencoder")
    if family == "diffusion":
        from lightning_mia.models.diffusion import LatentDiffusionModule

        model = LatentDiffusionModule(
            preset=preset, autoencoder=str(root / "autoencoder"), resolution=res
        )
        return model, res
    from lightning_mia.data.shapes import ShapesSource
    from lightning_mia.models.bart_tokenizer import train_caption_tokenizer
    from lightning_mia.models.seq2seq import Seq2SeqModule

    source = ShapesSource(num_samples=256, resolution=32, seed=0)
    captions = [source.caption(i) for i in range(256)]
    train_caption_tokenizer(captions, 512, root / "tokenizer")
    model = Seq2SeqModule(
        preset=preset, autoencoder=str(root / "autoencoder"), tokenizer=str(root / "tokenizer")
    )
    return model, res


def make_batch(batch, res, device):
    from lightning_mia.data.shapes import ShapesSource

    source = ShapesSource(num_samples=batch, resolution=res, seed=1)
    return {
        "pixel_values": torch.stack([source.image(i) for i in range(batch)]).to(device),
        "caption": [source.caption(i) for i in range(batch)],
        "sample_id": torch.arange(batch),
    }


def seconds_per_sample(model, batch, name, repeats):
    compute_signals(model, batch, [name], seed=0)  # warm-up
    sync = torch.cuda.synchronize if model.device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        compute_signals(model, batch, [name], seed=0)
    sync()
    return (time.perf_counter() - start) / (repeats * len(batch["sample_id"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=["diffusion", "seq2seq"], required=True)
    parser.add_argument("--preset", default="tiny", help="tiny | ldm-256 | dalle-mini")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    if (args.family, args.preset) not in AUTOENCODERS:
        parser.error(f"no benchmark set-up for {args.family} preset {args.preset!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, res = build_model(args.family, args.preset, Path(tmp))
    model = model.to(args.device).eval()
    batch = make_batch(args.batch, res, args.device)
    options = SignalOptions()
    print(f"# {args.family} {args.preset} {res}px, batch {args.batch}, device {args.device}")
    for name in signals_for(args.family):
        sps = seconds_per_sample(model, batch, name, args.repeats)
        passes = SIGNALS[name].queries_per_sample(options)
        print(f"RESULT {name}_model_passes_per_sample {passes}")
        print(f"RESULT {name}_seconds_per_sample {sps:.6f}")


if __name__ == "__main__":
    main()
