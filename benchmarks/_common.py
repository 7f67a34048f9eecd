"""What the family benchmarks share: arguments, random-init models, data, precision, memory,
FLOPs and the accelerator's peak (for model FLOP utilisation).

Used by bench_training.py and bench_generation.py. Models are random-init presets of any
registered family (`_families.build_model`: a trained model costs the same); the machine line
every benchmark prints is `_machine.print_machine`.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from _families import build_model, family_names, family_presets, shapes_items  # noqa: F401
from _machine import cpu_description, print_machine  # noqa: F401

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # Lightning's names
# Dense bf16/fp16 tensor-core peak of a GPU, TFLOP/s, by a substring of its CUDA device name
# (NVIDIA data sheets; without sparsity). The first match wins, so longer names come first.
PEAK_TFLOPS_16BIT = {
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM (and NVL: 835; pass --peak-tflops for it)
    "H200": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--family, --preset, --device, --precision, --threads."""
    parser.add_argument("--family", choices=family_names(), required=True)
    parser.add_argument("--preset", default="tiny", help="tiny | ldm-256 | dalle-mini")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One parser error for a preset of another family, a device that is not there, or a
    precision Lightning would replace (16-mixed on CPU runs as bf16-mixed)."""
    presets = family_presets(args.family)
    if args.preset not in presets:
        parser.error(f"--preset {args.preset!r}: {args.family} presets here are {presets}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    if args.device == "cpu" and args.precision == "16-mixed":  # Lightning would run bf16
        parser.error("--precision 16-mixed needs --device cuda (on CPU use bf16-mixed)")
    torch.set_num_threads(args.threads)


def peak_flops(device: str, precision: str, override_tflops: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s for `precision` on `device`, where it came from); (0, why) when unknown:
    `override_tflops` > 0 wins; a GPU's 16-bit peak is looked up by its name."""
    if override_tflops > 0:
        return override_tflops * 1e12, "--peak-tflops"
    if torch.device(device).type != "cuda":
        return 0.0, "no peak known for a CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name()
    if precision not in ("bf16-mixed", "16-mixed"):
        return 0.0, f"no {precision} peak in the table for {name} (give --peak-tflops)"
    for key, tflops in PEAK_TFLOPS_16BIT.items():
        if key in name:
            return tflops * 1e12, f"{name}: {tflops:g} TFLOP/s dense 16-bit"
    return 0.0, f"{name} is not in the peak table (give --peak-tflops)"


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of `fn()` (matmuls, convolutions, attention; forward and backward) by PyTorch's
    FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """The autocast context a hand-written loop needs to match Lightning's `precision`."""
    dtypes = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
    if precision not in dtypes:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtypes[precision])


def to_device(batch: dict[str, Any], device: str) -> dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def stopwatch(device: str) -> Iterator[list[float]]:
    """`with stopwatch(dev) as t: ...` then t[0] = seconds (the device synchronized) and t[1] =
    this process's CPU seconds (all threads): on a CPU shared with other work, wall time
    swings with their load while CPU time stays near the work done (with
    OMP_WAIT_POLICY=PASSIVE, so that waiting threads do not spin)."""
    elapsed: list[float] = []
    synchronize(device)
    start, cpu = time.perf_counter(), time.process_time()
    yield elapsed
    synchronize(device)
    elapsed.extend([time.perf_counter() - start, time.process_time() - cpu])


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_peak_cuda(fn: Callable[[], Any], device: str) -> tuple[Any, float]:
    """(fn(), peak CUDA memory allocated during it in MiB; 0 off CUDA)."""
    if torch.device(device).type != "cuda":
        return fn(), 0.0
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    return out, torch.cuda.max_memory_allocated() / 2**20
