"""Every registered attack, and what is derived from the registry rather than written down.

    from lightning_mia.attack.catalog import ATTACKS, paper_attacks, query_feature_groups
    paper_attacks()          # ['pixel', 'semantic', 'text', 'combined'] (the default list)
    query_feature_groups()   # the feature groups a query computes for the black-box attacks
    lira_features(["loss"])  # {'loss': 'loss/mean'}: the scalar LiRA calibrates per attack

Importing this module imports the feature and signal modules, which register their attacks.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning_mia.features  # noqa: F401 (registers the black-box attacks and `blind`)
import lightning_mia.graybox  # noqa: F401 (registers one gray-box attack per signal)
from lightning_mia.attack.spec import ATTACKS, AttackSpec


def paper_attacks() -> list[str]:
    """Wu et al.'s four attacks, in registration order: the default `--attacks`."""
    return [n for n, s in ATTACKS.items() if s.paper]


def baseline_attack() -> AttackSpec:
    """The learned baseline every report trains beside the attacks (`blind`)."""
    return next(s for s in ATTACKS.values() if s.baseline)


def query_feature_groups() -> list[str]:
    """Feature groups of every attack that reads generated images or the query alone: what a
    query computes beside its gray-box signals."""
    groups = [g for s in ATTACKS.values() if s.access != "gray-box" for g in s.groups]
    return list(dict.fromkeys(groups))


def lira_features(names: Sequence[str]) -> dict[str, str]:
    """{attack: the scalar feature LiRA calibrates} for the attacks among `names` that have one."""
    return {n: ATTACKS[n].score_feature for n in names if n in ATTACKS and ATTACKS[n].score_feature}


__all__ = ["ATTACKS", "baseline_attack", "lira_features", "paper_attacks", "query_feature_groups"]
