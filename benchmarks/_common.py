"""What the family benchmarks share: arguments, random-init models, data, precision, memory,
FLOPs and the accelerator's peak (for model FLOP utilisation).

Used by bench_training.py and bench_generation.py. Models are random-init presets (a trained
model costs the same): diffusion over a random KL autoencoder (the tiny demo's kind: diffusers'
StableDiffusionPipeline can decode it), seq2seq over bench_signals' random VQ tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from lightning_mia.data.shapes import ShapesSource

PRESETS = {"diffusion": ("tiny", "ldm-256"), "seq2seq": ("tiny", "dalle-mini")}
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")  # Lightning's names
# what picks the CPU kernels: ATen's own (vectorised ops), oneDNN's (conv, bf16 matmul), MKL's
CPU_ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
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
# diffusion preset -> (resolution, KL block channels (f = 2^(n-1)), latent channels)
KL_AUTOENCODERS = {
    "tiny": (32, (32, 64, 64), 4),  # configs/autoencoder/tiny-kl.yaml: 8x8x4 latents
    "ldm-256": (256, (128, 256, 512, 512), 4),  # Stable Diffusion's f8: 32x32x4 latents
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """--family, --preset, --device, --precision, --threads."""
    parser.add_argument("--family", choices=sorted(PRESETS), required=True)
    parser.add_argument("--preset", default="tiny", help="tiny | ldm-256 | dalle-mini")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="32-true")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def cpu_model_name() -> str:
    """The CPU's model name as `lscpu` prints it (/proc/cpuinfo, then the platform, if not)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    if not out and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            out = f.read().replace("model name", "Model name")
    for line in out.splitlines():
        if line.strip().startswith("Model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def native_bf16() -> bool:
    """Whether bf16 runs in hardware here: x86 AVX512_BF16 or AMX (Arm: the BF16 feature), and
    oneDNN may use it (ONEDNN_MAX_CPU_ISA can forbid it). Elsewhere bf16 is emulated: ~40x
    slower than float32 on an AVX2 CPU."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    if platform.machine().lower() in ("x86_64", "amd64"):
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        return " bf16" in f.read()
    return False


def cpu_description() -> str:
    """One line: CPU model, the kernels PyTorch dispatches to, native bf16, ISA overrides."""
    env = [f"{k}={os.environ[k]}" for k in CPU_ISA_ENV if k in os.environ]
    return (
        f"cpu: {cpu_model_name()}, {os.cpu_count()} cores, capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native bf16 "
        f"{'yes' if native_bf16() else 'no'}" + (f" ({', '.join(env)})" if env else "")
    )


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One parser error for a preset of another family, a device that is not there, or a
    precision Lightning would replace (16-mixed on CPU runs as bf16-mixed)."""
    if args.preset not in PRESETS[args.family]:
        parser.error(f"--preset {args.preset!r}: {args.family} presets are {PRESETS[args.family]}")
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


def random_kl_autoencoder(preset: str, folder: Path) -> int:
    """Save a random AutoencoderKL of the preset's size to `folder`; returns the resolution."""
    res, channels, latent = KL_AUTOENCODERS[preset]
    AutoencoderKL(
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1 if preset == "tiny" else 2,
        latent_channels=latent,
        norm_num_groups=32,
        sample_size=res,
        mid_block_add_attention=preset != "tiny",
    ).save_pretrained(folder)
    return res


def build_model(family: str, preset: str, root: Path) -> tuple[Any, int]:
    """(random-init family module of `preset`, its image resolution)."""
    torch.manual_seed(0)
    if family == "diffusion":
        from lightning_mia.models.diffusion import LatentDiffusionModule

        res = random_kl_autoencoder(preset, root / "autoencoder")
        model = LatentDiffusionModule(
            preset=preset, autoencoder=str(root / "autoencoder"), resolution=res
        )
        return model, res
    from bench_signals import build_model as build_seq2seq  # its random VQ + caption BPE

    return build_seq2seq(family, preset, root)


def shapes_items(num_samples: int, resolution: int) -> list[dict[str, Any]]:
    """Training items (image, caption, sample_id) of the embedded shapes data, in memory."""
    source = ShapesSource(num_samples=num_samples, resolution=resolution, seed=0)
    return [
        {"pixel_values": source.image(i), "caption": source.caption(i), "sample_id": i}
        for i in source.sample_ids()
    ]


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
