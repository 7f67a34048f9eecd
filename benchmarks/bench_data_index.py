"""The WebDataset shard index at CC3M scale: build time, re-open time, per-process memory.

    python benchmarks/bench_data_index.py                          # 100,000 samples, ~1-2 min
    python benchmarks/bench_data_index.py --samples 300000 --workers 8

Writes synthetic img2dataset-style shards (`--per-shard` samples each: a tiny PNG and a caption of
CC3M's mean length, ~55 characters) into a temporary folder, then measures, each in a fresh
process so that memory figures are its own:
- build: the first `WebDatasetSource(shards)`, which scans every shard (in `--workers` processes)
  and writes the index to the cache folder;
- open: a second process mapping that index (what every rank and spawned worker does), its RSS
  after opening, after `--reads` random reads by id (caption + image bytes), and after touching
  every page of the index (the worst case: an epoch over every sample); RSS counts mapped file
  pages, which the page cache shares between the ranks of a node; `anon` is private memory;
- fingerprint: the content hash that the first stage computes when it makes the splits (later
  stages read it from beside the index).
Then extrapolates linearly to `--target` samples (3.3 million: CC3M) and prints `RESULT` lines
(`*_at_target`; linear scaling of the fixed costs makes them upper bounds; re-opening maps files
and does not grow with the samples).
Goal: under 1 GB per rank at 3.3 million (RESULT rss_per_rank_at_target_mib < 1024).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CAPTION = "a photo of sample {} with a caption about as long as one of cc3m"  # ~60 characters


def write_shards(folder: Path, samples: int, per_shard: int) -> None:
    """Shards of tiny samples, written with tarfile (as img2dataset's webdataset writer does)."""
    from PIL import Image

    pngs = []
    for k in range(256):
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), (k, 255 - k, k // 2)).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    for s in range(0, samples, per_shard):
        with tarfile.open(folder / f"{s // per_shard:05d}.tar", "w") as tf:
            for i in range(s, min(s + per_shard, samples)):
                for ext, data in (("png", pngs[i % 256]), ("txt", CAPTION.format(i).encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


def memory_mib() -> dict[str, float]:
    """RSS, its file-backed and anonymous parts (Linux /proc), in MiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile"):
            fields[name] = int(value.split()[0]) / 1024
    return {"rss": fields["VmRSS"], "anon": fields["RssAnon"], "file": fields["RssFile"]}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in before}


def phase(name: str, shards: str, reads: int, workers: int) -> dict:
    """One measurement, in this (fresh) process."""
    import random
    import resource

    import numpy as np

    from lightning_mia.data.wds_index import open_index
    from lightning_mia.data.webdataset import WebDatasetSource, find_shards

    base = memory_mib()
    t0 = time.perf_counter()
    if name == "build":  # as the source would, with the asked number of scan processes
        open_index(find_shards(shards), num_workers=workers)
    src = WebDatasetSource(shards)
    out = {"seconds": time.perf_counter() - t0, "open": delta(memory_mib(), base)}
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base["rss"]
    if name == "build":
        out["disk_mib"] = sum(f.stat().st_size for f in src.index.folder.iterdir()) / 2**20
        return out
    ids = src.index.ids
    rng = random.Random(0)
    t0 = time.perf_counter()
    for _ in range(reads):
        sid = int(ids[rng.randrange(len(ids))])
        src.caption(sid)
        src.image_bytes(sid)
    out["read_us"] = (time.perf_counter() - t0) / reads * 1e6
    out["reads"] = delta(memory_mib(), base)
    index = src.index
    touched = int(np.asarray(index.rows["offset"]).sum()) + int(index.captions.sum())
    touched += int(index.keys.sum()) + int(index.ids.sum()) + len(index.digests.tobytes())
    out["touch_all"] = delta(memory_mib(), base)
    t0 = time.perf_counter()
    src.fingerprint()
    out["fingerprint_s"] = time.perf_counter() - t0
    out["fingerprint"] = delta(memory_mib(), base)
    t0 = time.perf_counter()
    WebDatasetSource(shards).fingerprint()  # a later stage: kept beside the index
    out["fingerprint_again_s"] = time.perf_counter() - t0
    return out


def run_phase(name: str, args: argparse.Namespace, shards: str, env: dict) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--phase",
        name,
        "--shards",
        shards,
        "--reads",
        str(args.reads),
        "--workers",
        str(args.workers),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {name} phase failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100_000, help="synthetic samples")
    parser.add_argument("--per-shard", type=int, default=10_000, help="samples per shard")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="scan processes")
    parser.add_argument("--reads", type=int, default=20_000, help="random reads by id")
    parser.add_argument("--target", type=int, default=3_300_000, help="extrapolate to (CC3M)")
    parser.add_argument("--phase", choices=["build", "open"], help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.shards, args.reads, args.workers)))
        return
    from _machine import print_machine  # here: the phases' memory figures stay torch-free

    print_machine()  # (its CPU account counts the phases: finished child processes)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        folder.mkdir()
        t0 = time.perf_counter()
        write_shards(folder, args.samples, args.per_shard)
        print(f"wrote {args.samples} samples in {time.perf_counter() - t0:.1f} s")
        repo = str(Path(__file__).resolve().parents[1])  # measure the package beside this file
        path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "LIGHTNING_MIA_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": path}
        build = run_phase("build", args, str(folder), env)
        reopen = run_phase("open", args, str(folder), env)
    report(args, build, reopen)


def report(args: argparse.Namespace, build: dict, reopen: dict) -> None:
    scale = args.target / args.samples
    print(json.dumps({"build": build, "open": reopen}, indent=1))
    worst = reopen["touch_all"]["rss"]
    results = {
        "samples": args.samples,
        "scan_workers": args.workers,
        "index_build_s": build["seconds"],
        "index_build_peak_mib": build["peak_mib"],
        "index_disk_mib": build["disk_mib"],
        "reopen_s": reopen["seconds"],
        "rss_after_open_mib": reopen["open"]["rss"],
        "rss_after_random_reads_mib": reopen["reads"]["rss"],
        "rss_after_touching_all_mib": worst,
        "anon_after_touching_all_mib": reopen["touch_all"]["anon"],
        "read_by_id_us": reopen["read_us"],
        "fingerprint_s": reopen["fingerprint_s"],
        "fingerprint_rss_mib": reopen["fingerprint"]["rss"],
        "fingerprint_again_s": reopen["fingerprint_again_s"],
        "index_build_s_at_target": build["seconds"] * scale,
        "index_build_peak_mib_at_target": build["peak_mib"] * scale,
        "fingerprint_s_at_target": reopen["fingerprint_s"] * scale,
        "fingerprint_rss_mib_at_target": reopen["fingerprint"]["rss"] * scale,
        "rss_per_rank_at_target_mib": worst * scale,
        "anon_per_rank_at_target_mib": reopen["touch_all"]["anon"] * scale,
    }
    for name, value in results.items():
        print(
            f"RESULT {name} {value:.4g}" if isinstance(value, float) else f"RESULT {name} {value}"
        )


if __name__ == "__main__":
    main()
