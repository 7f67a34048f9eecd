"""What an attack is: `AttackSpec`, the `ATTACKS` registry and what a query cost (`QueryCosts`).

An attack is declared once, beside the features or signals it reads:

    # lightning_mia/features/pixel.py
    register_attack(AttackSpec("pixel", ("pixel",), "black-box", paper=True, ...))
    # lightning_mia/graybox/spec.py registers one gray-box attack per signal

`lightning_mia.attack.catalog` imports those modules, so it holds every attack; the report's
attack list, the LiRA candidates and the query's feature groups are all read from it. This module
sits on a low floor (it imports only the registry) so that feature and signal modules can
register here without an import cycle.
"""

from __future__ import annotations

from collections.abc import Mapping
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
        paper: one of Wu et al.'s four attacks (the default attack list).
        baseline: reported among the baselines and trained in every report (`blind`).
    """

    name: str
    groups: tuple[str, ...]
    access: Access
    description: str = ""
    score_feature: str = ""
    paper: bool = False
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
                "(`attack.py --signals all`, or QueryModule(signals=[...]))"
            )
        return (
            f"compute the feature groups {list(self.groups)} in the query stage; delete the "
            "model's queries/<run-name>/ folder first if it was queried without them"
        )


ATTACKS: Registry[AttackSpec] = Registry("attack")


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add an attack to the registry (a name is taken once) and return it."""
    if not spec.groups:
        raise ValueError(f"attack {spec.name!r} reads no feature group")
    return ATTACKS.register(spec.name, spec)
