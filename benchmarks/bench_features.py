"""Feature extraction throughput: queries per second for every black-box feature group.

    python benchmarks/bench_features.py [--device cuda] [--batch 16] [--images 4] [--threads 1]

Uses a random-init tiny encoder (the cost of a trained one is the same) and random images at
32x32 (tiny preset) and 256x256. Prints `RESULT features_<group>_<res>px_qps <value>` lines.
"""

import argparse
import time

import torch
from _machine import print_machine

from lightning_mia.features import FEATURE_GROUPS, FeatureExtractor
from lightning_mia.models.encoder import EncoderModule


def bench(extractor, res, batch, images, device, repeats=3):
    query = torch.rand(batch, 3, res, res, device=device) * 2 - 1
    generated = torch.rand(batch, images, 3, res, res, device=device) * 2 - 1
    captions = ["a big red circle at the top left and a small blue star"] * batch
    extractor(query, generated, captions)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        extractor(query, generated, captions)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--images", type=int, default=4, help="generated images per query")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine(args.device)
    encoder = EncoderModule(preset="tiny").encoder.to(args.device).eval()
    for res in (32, 256):
        for group in FEATURE_GROUPS:
            extractor = FeatureExtractor(encoder, groups=[group])
            qps = bench(extractor, res, args.batch, args.images, args.device)
            print(f"RESULT features_{group}_{res}px_qps {qps:.1f}")


if __name__ == "__main__":
    main()
