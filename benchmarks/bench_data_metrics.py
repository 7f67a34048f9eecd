"""Two CPU paths every stage leans on: rendering the embedded shapes data and the bootstrap
intervals of the report.

    python benchmarks/bench_data_metrics.py [--images 1000] [--samples 10000] [--boot 1000]

- shapes: `ShapesSource.image` for `--images` ids at 32 px, first (rendered) and again (the
  source's cache), in ms per image;
- bootstrap: `metrics.bootstrap_interval(roc_auc)` over `--samples` scores with `--boot`
  resamples (the report's default), in seconds.

Prints the `MACHINE` line, then `RESULT shapes_render_ms`, `RESULT shapes_cached_ms` and
`RESULT bootstrap_auc_s`. These figures were timing assertions in the tests; a test must not
depend on how loaded the machine is, so they are measured here.
"""

from __future__ import annotations

import argparse
import time

import torch
from _machine import print_machine

from lightning_mia import metrics
from lightning_mia.data.shapes import ShapesSource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine("cpu")

    src = ShapesSource(args.images)
    timings = []
    for _ in range(2):  # rendered, then from the cache
        start = time.perf_counter()
        for i in range(args.images):
            src.image(i)
        timings.append(1000 * (time.perf_counter() - start) / args.images)

    g = torch.Generator().manual_seed(0)
    labels = torch.rand(args.samples, generator=g) < 0.5
    scores = torch.randn(args.samples, generator=g) + labels.float()
    start = time.perf_counter()
    low, high = metrics.bootstrap_interval(metrics.roc_auc, scores, labels, args.boot, seed=0)
    boot = time.perf_counter() - start

    print(f"shapes: {args.images} images, 32 px: {timings[0]:.3f} ms each, cached {timings[1]:.4f}")
    print(f"bootstrap: AUC [{low:.3f}, {high:.3f}], {args.boot} resamples of {args.samples}")
    print(f"RESULT shapes_render_ms {timings[0]:.4f}")
    print(f"RESULT shapes_cached_ms {timings[1]:.5f}")
    print(f"RESULT bootstrap_auc_s {boot:.4f}")


if __name__ == "__main__":
    main()
