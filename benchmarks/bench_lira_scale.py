"""LiRA on a stated scale: TPR@1%FPR and AUC of LiRA on raw vs log-scaled losses, mean vs median
centre, on synthetic log-normal losses with 16 shadows.

    python benchmarks/bench_lira_scale.py [--shadows 16] [--samples 2000] [--repeats 5]

The world (Carlini et al.'s online setting: every shadow trains on an independent half of the
target's pool): per-sample difficulty d ~ N(0, `--difficulty`²) on the log scale, a shadow's or
the target's loss exp(d - `--shift`·member + `--noise`·ε): positive and right-skewed, like a
denoising loss, SecMI's t-error or PIA's distance. LiRA (`attack.calibration.calibrate`) fits its
per-sample Gaussians to the raw losses (before: what the package did) or to their log (after:
`AttackSpec.score_scale = "log"`), centred at the mean (before) or the median (after, as
Carlini's script), one global variance per side (16 < 64 shadows). Offline and online, each over
`--repeats` seeds. TPR@FPR is read strictly below the budget (`metrics.tpr_at_fpr`).

Prints the CPU, its kernels and threads, a table, then `RESULT <name> <value>` lines (means over
the repeats): `lira_{offline,online}_{auc,tpr1}_{before,after}` and the two halves of the change
(`..._{log_mean,raw_median}`).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from _common import cpu_description

from lightning_mia.attack.calibration import calibrate, to_scale
from lightning_mia.metrics import roc_auc, tpr_at_fpr

VARIANTS = {  # name -> (scale, centre)
    "before": ("identity", "mean"),
    "raw_median": ("identity", "median"),
    "log_mean": ("log", "mean"),
    "after": ("log", "median"),
}


def world(args: argparse.Namespace, seed: int) -> tuple[torch.Tensor, ...]:
    """(shadow losses (M, S), shadow membership (M, S), target losses (S,), membership (S,))."""
    g = torch.Generator().manual_seed(seed)
    m, s = args.shadows, args.samples
    difficulty = args.difficulty * torch.randn(s, generator=g)  # (S,)
    is_in = torch.rand(m, s, generator=g) < 0.5  # (M, S)
    noise = args.noise * torch.randn(m, s, generator=g)
    shadow = torch.exp(difficulty - args.shift * is_in.float() + noise)
    member = torch.randperm(s, generator=g) < s // 2  # (S,), exactly half
    target = torch.exp(
        difficulty - args.shift * member.float() + args.noise * torch.randn(s, generator=g)
    )
    return shadow, is_in, target, member


def figures(args: argparse.Namespace, seed: int) -> dict[str, float]:
    """{"<mode>_<metric>_<variant>": value} for one world."""
    shadow, is_in, target, member = world(args, seed)
    observed = torch.ones_like(is_in)
    out = {}
    for variant, (scale, centre) in VARIANTS.items():
        x, scores = -to_scale(target, scale), -to_scale(shadow, scale)  # lower loss = member
        for mode, online in (("offline", False), ("online", True)):
            lira, _ = calibrate(x, scores, is_in, observed, online, True, 4, centre)
            out[f"{mode}_auc_{variant}"] = float(roc_auc(lira, member))
            out[f"{mode}_tpr1_{variant}"] = float(tpr_at_fpr(lira, member, 0.01))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shadows", type=int, default=16)
    parser.add_argument("--samples", type=int, default=2000, help="target samples (half members)")
    parser.add_argument("--repeats", type=int, default=5, help="seeds")
    parser.add_argument("--difficulty", type=float, default=1.0, help="std of log-difficulty")
    parser.add_argument("--shift", type=float, default=0.3, help="membership shift of log-loss")
    parser.add_argument("--noise", type=float, default=0.5, help="std of log-loss noise")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_description() + f", torch threads {torch.get_num_threads()}")
    print(
        f"{args.shadows} shadows, {args.samples} target samples, log-loss = d - {args.shift}"
        f"·member + {args.noise}·ε, d ~ N(0, {args.difficulty}²); {args.repeats} seeds"
    )
    runs = [figures(args, seed) for seed in range(args.repeats)]
    keys = list(runs[0])
    print(f"{'figure':28s} {'mean':>7s} {'sd':>7s}")
    for key in keys:
        values = [r[key] for r in runs]
        print(f"{key:28s} {statistics.mean(values):7.4f} {statistics.pstdev(values):7.4f}")
    for key in keys:
        print(f"RESULT lira_{key} {statistics.mean(r[key] for r in runs):.4f}")


if __name__ == "__main__":
    main()
