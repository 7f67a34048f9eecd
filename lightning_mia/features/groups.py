"""Feature groups by name: what each one computes and which embeddings it needs.

    FEATURE_GROUPS["pixel"].compute(inputs)  # {"pixel/mse_mean": (B,), ...}

Each feature module registers its group here (and its attack in `lightning_mia.specs.attacks`);
`FeatureExtractor` computes the union of embeddings the asked groups need in one batched pass
and hands every group the same `FeatureInputs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lightning_mia.registry import Registry

EMBEDDINGS = ("query", "generated", "text")  # what the attacker's encoder can provide


@dataclass(frozen=True)
class FeatureInputs:
    """One batch of queries as every group sees it (embeddings: those some group asked for)."""

    query: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32
    generated: torch.Tensor  # (B, N, 3, H', W') in [-1, 1], float32
    captions: list[str]  # the B captions the images were generated from
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # query/text (B, D),
    # generated (B, N, D): unit-norm encoder embeddings


@dataclass(frozen=True)
class FeatureGroup:
    """A named family of features `<name>/<feature>`, computed from `FeatureInputs`."""

    name: str
    compute: Callable[[FeatureInputs], dict[str, torch.Tensor]]
    embeddings: tuple[str, ...] = ()  # encoder embeddings it reads, from EMBEDDINGS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.embeddings) - set(EMBEDDINGS))
        if unknown:
            raise ValueError(f"feature group {self.name!r}: unknown embeddings {unknown}")

    @property
    def needs_encoder(self) -> bool:
        return bool(self.embeddings)


FEATURE_GROUPS: Registry[FeatureGroup] = Registry("feature group", plugins="lightning_mia.features")


def register_group(group: FeatureGroup) -> FeatureGroup:
    """Add a feature group (a name is taken once) and return it."""
    return FEATURE_GROUPS.register(group.name, group)
