"""The machine a benchmark ran on, as the one `MACHINE` line every benchmark prints.

    from _machine import print_machine
    print_machine(args.device)      # after torch.set_num_threads, before the RESULT lines

Rule: every script in benchmarks/ that prints `RESULT` lines prints one `MACHINE` line first
(`benchmarks/perf_table.py` files each figure under it). The line names the CPU model (lscpu,
else /proc/cpuinfo), its cores, the kernels PyTorch dispatches to (`get_cpu_capability()`,
which honours `ATEN_CPU_CAPABILITY`; the override is named), the torch CPU threads, whether
bf16 runs natively, the torch version and the device (with the GPU's name on CUDA):

    MACHINE cpu: Intel(R) Xeon(R) Processor, 2 cores; kernels: AVX2 (ATEN_CPU_CAPABILITY=avx2);
    threads: 2; native bf16: yes; torch: 2.13.0+cpu; device: cpu       (one line)

and, when the script ends, `# other processes: N% of one core during the run`: the CPU time
the rest of the machine used beside it (0% = it ran alone).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import platform
import resource
import subprocess
import time

import torch

# what picks the CPU kernels: ATen's own (vectorised ops), oneDNN's (conv, bf16 matmul), MKL's
CPU_ISA_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


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


def kernels() -> str:
    """The CPU capability PyTorch dispatches to, with the ISA overrides in force: `AVX2
    (ATEN_CPU_CAPABILITY=avx2)`."""
    env = [f"{k}={os.environ[k]}" for k in CPU_ISA_ENV if os.environ.get(k)]
    capability = torch.backends.cpu.get_cpu_capability()
    return capability + (f" ({', '.join(env)})" if env else "")


def cpu_description() -> str:
    """One line: CPU model, cores, the kernels PyTorch dispatches to, native bf16."""
    return (
        f"cpu: {cpu_model_name()}, {os.cpu_count()} cores, capability {kernels()}, "
        f"native bf16 {'yes' if native_bf16() else 'no'}"
    )


def machine_line(device: str = "cpu") -> str:
    """The `MACHINE ...` line (module docstring) for a run on `device`."""
    dev = torch.device(device)
    where = dev.type
    if dev.type == "cuda" and torch.cuda.is_available():
        where = f"cuda {torch.cuda.get_device_name(dev)}"
    return (
        f"MACHINE cpu: {cpu_model_name()}, {os.cpu_count()} cores; kernels: {kernels()}; "
        f"threads: {torch.get_num_threads()}; native bf16: {'yes' if native_bf16() else 'no'}; "
        f"torch: {torch.__version__}; device: {where}"
    )


def busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, all cores (/proc/stat)."""
    with open("/proc/stat", encoding="utf-8") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds of this process and its finished children, all threads."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def others_line(start: tuple[float, float, float]) -> str:
    """`# other processes: 3% of one core during the run (...)`: the machine's busy CPU time
    since `start` = (wall, busy, own) less this process's own: what ran beside the benchmark
    (0% = it ran alone). The load average cannot say this: the benchmark's own threads count."""
    wall = time.monotonic() - start[0]
    busy, own = busy_seconds() - start[1], own_seconds() - start[2]
    others = max(0.0, busy - own) / max(wall, 1e-9)
    return (
        f"# other processes: {100 * others:.0f}% of one core during the run ({wall:.0f} s; the "
        f"machine busy {100 * busy / max(wall, 1e-9):.0f}%, this process "
        f"{100 * own / max(wall, 1e-9):.0f}%)"
    )


def print_machine(device: str = "cpu") -> str:
    """Print the `MACHINE` line and, at exit, how much CPU other processes used meanwhile (a
    figure measured beside other CPU-heavy work says so); return the line. Flushed, so it
    precedes a child process's output."""
    line = machine_line(device)
    print(line, flush=True)
    start = (time.monotonic(), busy_seconds(), own_seconds())
    atexit.register(lambda: print(others_line(start), flush=True))
    return line
