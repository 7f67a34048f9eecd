"""Attack stage: the registry of attacks, by name, and the feature groups each one reads.

    from lightning_mia.attack import ATTACKS, register_attack, AttackSpec
    ATTACKS["combined"].groups  # ('pixel', 'semantic', 'text', 'quality')

An attack is a classifier over the features of its groups (features are named
`<group>/<name>` in the query shards). A new attack slots in by one `register_attack` call;
the runner, the feature checks and the report pick it up by name. This module imports nothing
heavy so that the feature extractor can read the registry without a dependency tangle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lightning_mia.errors import UserError

Access = Literal["black-box", "gray-box", "none"]


class AttackError(UserError):
    """Attack inputs that cannot give a valid result (missing features, mixed experiments...)."""


@dataclass(frozen=True)
class AttackSpec:
    """One attack: its feature groups, the model access it needs and what it costs.

    `queries_per_sample` is a fixed count (0 for attacks that never query the model) or the
    name of a context key holding it (e.g. "num_images": black-box attacks read the N images
    generated per caption).
    """

    name: str
    groups: tuple[str, ...]
    access: Access
    queries_per_sample: int | str = "num_images"
    how_to_compute: str = ""  # hint printed when the shards lack the attack's features

    def queries(self, context: Mapping[str, Any]) -> int | None:
        """Model queries per sample under `context` (None when the context does not say)."""
        if isinstance(self.queries_per_sample, int):
            return self.queries_per_sample
        value = context.get(self.queries_per_sample)
        return None if value is None else int(value)


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Add (or replace) an attack in the registry and return it."""
    if not spec.groups:
        raise ValueError(f"attack {spec.name!r} reads no feature group")
    ATTACKS[spec.name] = spec
    return spec


_QUERY_HINT = (
    "compute them in the query stage (lightning_mia.query.run.run_query(ckpt, "
    "feature_groups=[...]) with groups {groups}); delete the model's queries/<run-name>/ "
    "folder first if it was queried without them"
)

for _name, _groups in {
    "pixel": ("pixel",),
    "semantic": ("semantic",),
    "text": ("text", "quality"),
    "combined": ("pixel", "semantic", "text", "quality"),
}.items():
    register_attack(
        AttackSpec(_name, _groups, "black-box", "num_images", _QUERY_HINT.format(groups=_groups))
    )
register_attack(AttackSpec("blind", ("blind",), "none", 0, _QUERY_HINT.format(groups=("blind",))))

# Gray-box signals (ATTACKS.md "Beyond the paper"): the query count comes from the context key
# `<name>_queries` (e.g. timesteps x noise draws), written by the stage that computes them.
for _name in ("loss", "secmi", "pia", "clid", "nll", "nll_gap"):
    register_attack(
        AttackSpec(
            _name,
            (_name,),
            "gray-box",
            f"{_name}_queries",
            f"compute the gray-box '{_name}' features in the query stage (group '{_name}')",
        )
    )

BLACK_BOX_ATTACKS: dict[str, AttackSpec] = {
    n: s for n, s in ATTACKS.items() if s.access in ("black-box", "none")
}
# attack name -> feature groups, for the feature extractor (black-box attacks and blind)
ATTACK_GROUPS: dict[str, list[str]] = {n: list(s.groups) for n, s in BLACK_BOX_ATTACKS.items()}
BASELINE_ATTACK = "blind"  # trained as a baseline in every report, not listed as an attack

__all__ = [
    "ATTACKS",
    "ATTACK_GROUPS",
    "BASELINE_ATTACK",
    "BLACK_BOX_ATTACKS",
    "AttackError",
    "AttackSpec",
    "register_attack",
]
