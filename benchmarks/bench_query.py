"""Query-stage cost: generated images/s against feature-extraction images/s.

    python benchmarks/bench_query.py --family diffusion [--num-images 4] [--device cuda]
    python benchmarks/bench_query.py --family seq2seq

Builds random-init tiny models (a trained model costs the same) with a random VQ autoencoder
and a random tiny CLIP encoder, then times, on one batch of shapes captions, `generate` (N
images per caption) and the `FeatureExtractor` over all feature groups (pixel, semantic, text,
quality, blind). Ends with `RESULT features_share_of_query_time <fraction>` (goal: < 0.10).
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _families import build_model, family_names, make_batch  # the same random tiny models
from _machine import print_machine
from transformers import CLIPModel

from lightning_mia.features.extractor import FEATURE_GROUPS, FeatureExtractor
from lightning_mia.models.encoder import ImageTextEncoder, clip_config
from lightning_mia.models.tokenizers import char_clip_tokenizer


def timed(fn, repeats, device):
    fn()  # warm-up
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync()
    return (time.perf_counter() - start) / repeats, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=family_names(), required=True)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(args.device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, res = build_model(args.family, "tiny", Path(tmp))
    model = model.to(args.device).eval()
    tokenizer = char_clip_tokenizer()
    encoder = ImageTextEncoder(CLIPModel(clip_config("tiny", tokenizer)), tokenizer).eval()
    extractor = FeatureExtractor(encoder.to(args.device), groups=list(FEATURE_GROUPS))
    batch = make_batch(args.batch, res, args.device)
    captions, n = batch["caption"], args.num_images
    with torch.no_grad():
        gen_s, generated = timed(
            lambda: model.generate(captions, n, seed=0), args.repeats, args.device
        )
        feat_s, _ = timed(
            lambda: extractor(batch["pixel_values"], generated, captions), args.repeats, args.device
        )
    images = args.batch * n
    print(f"# {args.family} tiny {res}px, {args.batch} captions x N={n}, device {args.device}")
    print(f"RESULT generated_images_per_s {images / gen_s:.1f}")
    print(f"RESULT feature_images_per_s {images / feat_s:.1f}")
    print(f"RESULT features_share_of_query_time {feat_s / (gen_s + feat_s):.4f}")


if __name__ == "__main__":
    main()
