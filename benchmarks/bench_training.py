"""Training throughput of a family module: Lightning's Trainer vs a hand-written PyTorch loop.

    python benchmarks/bench_training.py --family diffusion             # tiny, CPU, ~1 min
    python benchmarks/bench_training.py --family seq2seq
    python benchmarks/bench_training.py --family diffusion --preset ldm-256 --device cuda \
        --precision bf16-mixed --batch-size 16 --steps 20

The same module (random-init preset, frozen autoencoder), data (shapes images in memory, the
autoencoder's latents / VQ codes cached by sample_id in both), batch, optimizer and LR schedule
(the module's `configure_optimizers`), for the same number of optimizer steps: `Trainer.fit`
(no logger, no checkpointing, no progress bar, no model summary; set-up included) against a
plain loop of `per_sample_loss(batch).mean()`, backward, step (with autocast and, for 16-mixed,
a GradScaler to match `--precision`). The two alternate `--rounds` times so drifting machine load
hits both alike. Prints the median samples/s of each and
`RESULT train_lightning_over_plain <Lightning samples/s / plain samples/s>`, the median over
rounds of each round's ratio (goal >= 0.95), `RESULT train_samples_per_s` (Lightning's) and, where
the accelerator's peak is known (`--peak-tflops`, or a GPU's dense 16-bit peak by name),
`RESULT train_mfu`: the FLOPs of one optimizer step (PyTorch's FLOP counter over a plain step:
forward, backward) times Lightning's steps/s, over the peak.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from _common import (
    add_common_args,
    autocast,
    build_model,
    check_args,
    counted_flops,
    peak_flops,
    peak_rss_mib,
    print_machine,
    shapes_items,
    stopwatch,
    to_device,
)
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_mia.data.datamodule import collate_samples

DEFAULT_STEPS = {"diffusion": 70, "seq2seq": 120}  # tiny, one CPU core: ~1 min (others: 70)


def optimizer_and_scheduler(model: Any) -> tuple[torch.optim.Optimizer, Any]:
    """What `configure_optimizers` returns, for the plain loop (a dict, as both families do)."""
    config = model.configure_optimizers()
    scheduler = config.get("lr_scheduler")
    if isinstance(scheduler, dict):
        scheduler = scheduler["scheduler"]
    return config["optimizer"], scheduler


def plain_fit(model: Any, loader: DataLoader, steps: int, device: str, precision: str) -> float:
    """Seconds for `steps` optimizer steps of a hand-written loop."""
    model.to(device).train()
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=precision == "16-mixed")
    with stopwatch(device) as elapsed:
        opt, sched = optimizer_and_scheduler(model)
        done = 0
        while done < steps:
            for batch in loader:
                with autocast(precision, device):
                    loss = model.per_sample_loss(to_device(batch, device)).mean()
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                if sched is not None:
                    sched.step()
                done += 1
                if done == steps:
                    break
    return elapsed[0]


def lightning_fit(model: Any, loader: DataLoader, steps: int, device: str, precision: str) -> float:
    """Seconds for `Trainer.fit` to run `steps` optimizer steps (set-up included)."""
    trainer = Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model.train()
    with stopwatch(device) as elapsed:
        trainer.fit(model, loader)
    return elapsed[0]


@torch.no_grad()
def fill_caches(model: Any, loader: DataLoader, device: str, precision: str) -> None:
    """One pass in training mode: latents / codes cached by sample_id, kernels warmed up."""
    model.to(device).train()
    for batch in loader:
        with autocast(precision, device):
            model.per_sample_loss(to_device(batch, device))


def train_ratio(args: argparse.Namespace) -> float:
    """Lightning samples/s over the plain loop's (same model, data, optimizer, steps)."""
    steps = args.steps or DEFAULT_STEPS.get(args.family, 70)
    with tempfile.TemporaryDirectory() as tmp:
        model, res = build_model(args.family, args.preset, Path(tmp))
    items = shapes_items(args.num_samples, res)
    loader = DataLoader(items, args.batch_size, shuffle=True, collate_fn=collate_samples)
    fill_caches(model, loader, args.device, args.precision)
    plain_fit(model, loader, 2, args.device, args.precision)  # warm-up (allocator, autograd)
    step_flops = counted_flops(lambda: plain_fit(model, loader, 1, args.device, args.precision))
    plain, light = [], []
    for _ in range(args.rounds):  # alternate, so drifting machine load hits both alike
        plain.append(plain_fit(model, loader, steps, args.device, args.precision))
        light.append(lightning_fit(model, loader, steps, args.device, args.precision))
    samples = steps * args.batch_size
    p, li = samples / statistics.median(plain), samples / statistics.median(light)
    # each round's own ratio (the two ran back to back), then the median over rounds
    ratio = statistics.median([t_plain / t_light for t_plain, t_light in zip(plain, light)])
    print(
        f"# {args.family} {args.preset} {res}px, batch {args.batch_size}, {steps} steps x "
        f"{args.rounds} rounds, {args.device} {args.precision}, {torch.get_num_threads()} threads"
    )
    print(f"plain loop: {p:.2f} samples/s  (rounds: {', '.join(f'{t:.2f}' for t in plain)} s)")
    print(f"Lightning:  {li:.2f} samples/s  (rounds: {', '.join(f'{t:.2f}' for t in light)} s)")
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    if args.device == "cuda":
        print(f"peak CUDA memory allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    print(f"RESULT train_lightning_over_plain {ratio:.3f}")
    print(f"RESULT train_samples_per_s {li:.2f}")
    peak, source = peak_flops(args.device, args.precision, args.peak_tflops)
    achieved = step_flops * li / args.batch_size  # FLOPs per step x Lightning's steps/s
    print(f"{step_flops / 1e9:.1f} GFLOP per step, {achieved / 1e12:.2f} TFLOP/s; peak: {source}")
    if peak > 0:
        print(f"RESULT train_mfu {achieved / peak:.3f}")
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--steps", type=int, default=0, help="per run; 0 = the family's default")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=64, help="training pairs")
    parser.add_argument("--rounds", type=int, default=3)
    peak = "accelerator peak TFLOP/s for MFU; 0 = a GPU's dense 16-bit peak by name"
    parser.add_argument("--peak-tflops", type=float, default=0.0, help=peak)
    args = parser.parse_args()
    check_args(parser, args)
    print_machine(args.device)
    train_ratio(args)


if __name__ == "__main__":
    main()
