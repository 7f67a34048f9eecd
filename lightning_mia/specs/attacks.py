"""What an attack is: `AttackSpec`, the `ATTACKS` registry, and what a query cost (`QueryCosts`).

An attack is declared once, beside the features or signals it reads:

    # lightning_mia/features/pixel.py
    register_attack(AttackSpec("pixel", ("pixel",), "black-box", paper=1, ...))
    # lightning_mia/graybox/spec.py registers one gray-box attack per signal

`ATTACKS` finds those declarations by importing the modules of `lightning_mia.features` and
`lightning_mia.graybox` when it is first listed; the report's attack list, LiRA's candidates and
the query's feature groups are all read from it (`paper_attacks`, `query_feature_groups`,
`baseline_attack`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lightning_mia.errors import UserError
from lightning_mia.registry import Registry

Access = Literal["black-box", "gray-box", "none"]


class AttackError(UserError):
    """Attack inputs that cannot give a valid result (missing features, mixed experiments...)."""


@dataclass(frozen=True)
class QueryCosts:
    """What querying a model cost, per sample: the report's `queries_per_sample` and
    `seconds_per_sample` are read from it."""

    num_images: int | None = None  # N images generated per caption (black-box queries)
    signal_queries: Mapping[str, int] = field(default_factory=dict)  # model passes per signal
    seconds: Mapping[str, float] = field(default_factory=dict)  # generate, features, <signal>


@dataclass(frozen=True)
class AttackSpec:
    """One attack: the feature groups it reads, the access it needs, what calibrates it.

    Attributes:
        name: the attack's name in configs, `--attacks` and the report.
        groups: feature groups (features named `<group>/<name>` in the query shards).
        access: "black-box" (generated images), "gray-box" (model weights) or "none".
        description: one line for listings and the README.
        score_feature: the one scalar LiRA calibrates per sample ("" = not calibrated).
        paper: which of Wu et al.'s four attacks it is (1-4 = I-IV, the default attack list);
            0 = not one of them.
        baseline: reported among the baselines and trained in every report (`blind`).
    """

    name: str
    groups: tuple[str, ...]
    access: Access
    description: str = ""
    score_feature: str = ""
    paper: int = 0
    baseline: bool = False

    def queries(self, costs: QueryCosts) -> int | None:
        """Model queries per sample (None when the costs do not say)."""
        if self.access == "none":
            return 0
        if self.access == "black-box":
            return costs.num_images
        counts = [costs.signal_queries.get(g) for g in self.groups]
        return None if None in counts else int(sum(counts))

    def seconds(self, costs: QueryCosts) -> float | None:
        """Measured seconds per sample of what this attack reads (None when not measured)."""
        measured = costs.seconds
        if self.access == "black-box":
            total = measured.get("generate", 0.0) + measured.get("features", 0.0)
            return total or None
        if self.access == "none":  # an upper bound: the blind features are part of these
            return measured.get("features")
        return measured.get(self.name)

    @property
    def how_to_compute(self) -> str:
        """What to do when the query shards lack this attack's features."""
        if self.access == "gray-box":
            return (
                f"compute the gray-box signal(s) {list(self.groups)} in the query stage "
                "(`attack.py --query.signals all`)"
            )
        return (
            f"compute the feature groups {list(self.groups)} in the query stage; delete the "
            "model's queries/<run-name>/ folder first if it was queried without them"
        )


ATTACKS: Registry[AttackSpec] = Registry(
    "attack", plugins=("lightning_mia.features", "lightning_mia.graybox")
)


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add an attack to the registry (a name is taken once) and return it."""
    if not spec.groups:
        raise ValueError(f"attack {spec.name!r} reads no feature group")
    return ATTACKS.register(spec.name, spec)


def paper_attacks() -> list[str]:
    """Wu et al.'s four attacks, I to IV: the default `--attacks`."""
    return [s.name for s in sorted(ATTACKS.values(), key=lambda s: s.paper) if s.paper]


def listing_order(names: Sequence[str]) -> list[str]:
    """`names` as reports list them: the paper's attacks (I-IV), the other black-box ones, then
    the gray-box ones, each in registration order."""
    rank = {"black-box": 0, "none": 1, "gray-box": 2}
    position = {n: i for i, n in enumerate(ATTACKS.names())}
    return sorted(
        names, key=lambda n: (rank[ATTACKS[n].access], ATTACKS[n].paper or 5, position[n])
    )


def baseline_attack() -> AttackSpec:
    """The learned baseline every report trains beside the attacks (`blind`)."""
    return next(s for s in ATTACKS.values() if s.baseline)


def query_feature_groups() -> list[str]:
    """Feature groups of every attack that reads generated images or the query alone: what a
    query computes beside its gray-box signals."""
    groups = [g for s in ATTACKS.values() if s.access != "gray-box" for g in s.groups]
    return list(dict.fromkeys(groups))
