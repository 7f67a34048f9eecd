"""`SplitConfig`: what splits.json is drawn from besides the data, and its checks.

Every problem of a config is collected and reported at once, as one `DataError` line.

    cfg = SplitConfig(num_shadows=4, target_size=2048, aux_size=8192, public_size=4096)
    cfg.recorded()                 # the config as splits.json keeps it
    config_problems(cfg, t, a, n)  # every problem with these sizes for n usable samples
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from lightning_mia.data.duplicates import DUPLICATE_POLICIES, DuplicatePolicy

ShadowPool = Literal["auxiliary", "auxiliary+queries"]
SHADOW_POOLS = ("auxiliary", "auxiliary+queries")
# SplitConfig fields added after the format was fixed: recorded only when not at their default,
# so splits.json made before them (and without them) keeps its hash
LATER_FIELDS = {"public_size": None, "duplicates": "report"}


@dataclass(frozen=True)
class SplitConfig:
    """What splits.json is drawn from, besides the data (see `make_splits`)."""

    num_shadows: int = 2
    target_size: int | None = None  # None: half the data (or what aux_size leaves)
    aux_size: int | None = None  # None: same as target_size (or the other half)
    member_fraction: float = 0.5
    seed: int = 0
    shadow_pool: ShadowPool = "auxiliary"
    shadow_size: int | None = None  # None: each shadow splits the whole shadow pool
    public_size: int | None = None  # None: no public pool; else its size (attacker's components)
    duplicates: DuplicatePolicy = "report"  # duplicate images: "report" them, or "drop" copies

    def recorded(self) -> dict[str, Any]:
        """The config as splits.json records it (later fields only when not at their default)."""
        config = asdict(self)
        for key, default in LATER_FIELDS.items():
            if config[key] == default:
                del config[key]
        return config


def resolve_sizes(n: int, target_size: int | None, aux_size: int | None) -> tuple[int, int]:
    """Default: half/half of n; one size given: the other is the same (at most what is left)."""
    if target_size is None and aux_size is None:
        return n // 2, n - n // 2
    if aux_size is None:
        return target_size, max(0, min(target_size, n - target_size))
    if target_size is None:
        return max(0, min(aux_size, n - aux_size)), aux_size
    return target_size, aux_size


def config_problems(cfg: SplitConfig, t: int, a: int, n: int) -> list[str]:
    """Every problem with the asked split settings for `n` usable samples (all reported at once)."""
    problems = []
    if cfg.num_shadows < 0:
        problems.append(f"num_shadows must be >= 0, got {cfg.num_shadows}")
    if not 0.0 < cfg.member_fraction < 1.0:
        problems.append(f"member_fraction must be in (0, 1), got {cfg.member_fraction}")
    if cfg.shadow_pool not in SHADOW_POOLS:
        problems.append(f"shadow_pool must be one of {SHADOW_POOLS}, got {cfg.shadow_pool!r}")
    if cfg.duplicates not in DUPLICATE_POLICIES:
        problems.append(f"duplicates must be one of {DUPLICATE_POLICIES}, got {cfg.duplicates!r}")
    if t < 2:
        problems.append(f"target_size must be >= 2, got {t}")
    if cfg.num_shadows > 0 and a < 2:
        problems.append(f"aux_size must be >= 2 when there are shadows, got {a}")
    p = cfg.public_size or 0
    if cfg.public_size is not None and cfg.public_size < 1:
        problems.append(f"public_size must be >= 1 (or unset: no public pool), got {p}")
    if t + a + p > n:
        public = f" + public_size {p}" if cfg.public_size is not None else ""
        problems.append(f"target_size {t} + aux_size {a}{public} > the {n} usable samples")
    if cfg.shadow_size is not None and not 2 <= cfg.shadow_size <= a:
        problems.append(f"shadow_size must be in [2, aux_size={a}], got {cfg.shadow_size}")
    shadow = cfg.shadow_size or (a if cfg.shadow_pool == "auxiliary" else a + t)
    for what, size in [("target", t)] + ([("shadow", shadow)] if cfg.num_shadows > 0 else []):
        k = round(cfg.member_fraction * size)
        if 0 < cfg.member_fraction < 1 and size >= 2 and not 1 <= k < size:
            problems.append(
                f"member_fraction {cfg.member_fraction} of a {what} pool of {size} leaves "
                f"{k} members and {size - k} non-members (each needs one)"
            )
    return problems
