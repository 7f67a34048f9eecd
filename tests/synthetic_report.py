"""A synthetic diffusion experiment's query tables (every black-box, gray-box and complexity
feature), for tests and for looking at a full report without training a model.

    tables = synthetic_world(layout, members=500, shadows=4)      # (target, shadows, calibration)
    python tests/synthetic_report.py /tmp/report                 # writes report.json/.md, roc.png

Each sample has a complexity c (log-normal): every reconstruction error is c x exp(noise), lower
by a membership shift for members, so raw errors rank by complexity, calibrated ones by
membership. Shadows draw their own samples (all OUT for the target's, as the default splits).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from lightning_mia.paths import ExperimentLayout, run_name
from lightning_mia.query.shards import load_query_table, write_shard
from lightning_mia.specs.query import QueryRecord, QuerySpec

STATS = ("mean", "min", "max", "std")


def _features(member: torch.Tensor, complexity: torch.Tensor, g: torch.Generator) -> dict:
    """Features (S,) of every group, leaking membership by different amounts."""
    n, m = member.numel(), member.float()
    noise = lambda s=1.0: s * torch.randn(n, generator=g)  # noqa: E731

    def error(shift: float, spread: float = 0.3) -> torch.Tensor:  # positive, lower = member
        return complexity * torch.exp(-shift * m + noise(spread))

    mse = 0.01 * error(0.6)
    feats = {f"pixel/mse_{s}": mse * (1 + 0.1 * i) for i, s in enumerate(STATS)}
    feats |= {f"pixel/psnr_{s}": -10 * torch.log10(mse) + noise(0.1) for s in STATS}
    feats |= {f"pixel/ssim_{s}": 0.5 + 0.1 * m + noise(0.1) for s in STATS}
    feats |= {f"semantic/cos_{s}": 0.6 + 0.05 * m + noise(0.1) for s in STATS}
    feats |= {f"text/gen_cos_{s}": 0.3 + 0.02 * m + noise(0.05) for s in STATS}
    feats |= {f"quality/brisque_{s}": 40 + noise(5) for s in STATS}
    feats |= {f"blind/x{i}": noise() for i in range(3)}
    feats |= {"complexity/png_bpp": 4 * complexity * torch.exp(noise(0.05))}
    feats |= {"complexity/highpass": 0.02 * complexity.sqrt() * torch.exp(noise(0.3))}
    feats |= {f"loss/eps_t{t}": error(0.4 * 100 / t) for t in (100, 200, 300)}
    feats |= {f"loss/t{t}": error(0.3 * 100 / t) for t in (100, 200, 300)}
    feats["loss/mean"] = torch.stack([feats[f"loss/t{t}"] for t in (100, 200, 300)]).mean(0)
    feats |= {"secmi/t_error": error(0.5), "secmi/err_max": error(0.3), "secmi/err_p90": error(0.3)}
    feats |= {f"pia/t{t}": error(0.7 - t / 1000) ** 2 for t in (100, 200, 300)}
    feats["pia/mean"] = torch.stack([feats[f"pia/t{t}"] for t in (100, 200, 300)]).mean(0)
    feats |= {"clid/loss_cond": error(0.3), "clid/gap_null": 0.2 * m + noise(0.5)}
    feats |= {f"clid/gap_cut{r}": 0.1 * m + noise(0.5) for r in (30, 50, 70)}
    feats["clid/score"] = (feats["clid/gap_null"] + feats["clid/gap_cut50"]) / 2
    return feats


def _table(layout, folder, index, ids, member, complexity):
    g = torch.Generator().manual_seed(int(ids[0]) + 7919 * index + int(member.sum()))
    spec = QuerySpec(num_images=4, seed=0, encoder="enc")
    name = run_name("diffusion", index)
    record = QueryRecord(splits_hash="synthetic", run_name=name, family="diffusion", spec=spec)
    feats = _features(member, complexity, g)
    write_shard(folder / "shard-0.safetensors", ids, member, index, feats, record)
    return load_query_table(folder)


def synthetic_world(layout: ExperimentLayout, members: int = 500, shadows: int = 4, seed: int = 0):
    """(target table, shadow tables, calibration tables) of a synthetic experiment."""
    n = 2 * members
    half = torch.arange(n) % 2 == 0

    def complexity(k):
        return torch.exp(0.8 * torch.randn(n, generator=torch.Generator().manual_seed(seed + k)))

    target_c = complexity(0)
    ids = torch.arange(n)
    target = _table(layout, layout.queries(run_name("diffusion", 0)), 0, ids, half, target_c)
    shadow_tables, calibration = [], []
    for k in range(1, shadows + 1):
        folder = layout.queries(run_name("diffusion", k))
        own = torch.arange(n) + 10_000 * k
        shadow_tables.append(_table(layout, folder, k, own, half, complexity(k)))
        out = torch.zeros(n, dtype=torch.bool)
        calibration.append(_table(layout, folder / "row-000", k, ids, out, target_c))
    return target, shadow_tables, calibration


def main(out: str) -> None:
    from lightning_mia.attack.render import write_report
    from lightning_mia.attack.runner import run_attacks

    layout = ExperimentLayout(Path(out) / "exp")
    target, shadows, calibration = synthetic_world(layout)
    report = run_attacks(
        layout,
        target,
        shadows,
        ["all"],
        calibration=calibration,
        max_epochs=30,
        n_boot=200,
        progress=False,
    )
    write_report(Path(out), report)


if __name__ == "__main__":
    main(sys.argv[1])
