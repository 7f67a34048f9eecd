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
# The scale LiRA fits its Gaussians on (`attack.calibration.to_scale`): "log" for a positive
# error (a loss, SecMI's t-error, PIA's distance), "logit" for a probability in (0, 1),
# "identity" for a score already on a log or signed scale (PSNR, a cosine, a logit, a gap).
Scale = Literal["identity", "log", "logit"]
SCALES = ("identity", "log", "logit")
MLP_SUFFIX = "-mlp"  # the row of a learned classifier that is not its paper's own statistic


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
        score_scale: the scale of `score_feature` LiRA fits its Gaussians on (`Scale`).
        calibrated_by: query-only feature groups that normalise `score_feature`, a
            reconstruction error of the query image (the `<name>-cc` row, `attack.complexity`);
            the query computes them with the attack's own groups.
    """

    name: str
    groups: tuple[str, ...]
    access: Access
    description: str = ""
    score_feature: str = ""
    paper: int = 0
    baseline: bool = False
    score_scale: Scale = "identity"
    calibrated_by: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.score_scale not in SCALES:
            raise ValueError(
                f"attack {self.name!r}: score_scale {self.score_scale!r} not in {SCALES}"
            )

    @property
    def learned_row(self) -> str:
        """The report row of the classifier learned over `groups`: the attack's name where its
        paper's attack is such a classifier (Wu et al.'s black-box attacks, and any attack that
        does not read a model's weights), `<name>-mlp` for a gray-box attack, whose paper
        thresholds one statistic (that statistic's row: `attack.reference`)."""
        return f"{self.name}{MLP_SUFFIX}" if self.access == "gray-box" else self.name

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
    """Feature groups of every attack that reads generated images or the query alone, and the
    query-only groups that calibrate any attack's score: what a query computes beside its
    gray-box signals."""
    groups = [g for s in ATTACKS.values() if s.access != "gray-box" for g in s.groups]
    groups += [g for s in ATTACKS.values() for g in s.calibrated_by]
    return list(dict.fromkeys(groups))
