"""Black-box membership features: images and captions -> named per-sample scalars.

Groups (ATTACKS.md), each registered in `FEATURE_GROUPS` by its module together with the attack
that reads it: `pixel` (attack I), `semantic` (II), `text` and `quality` (III), `blind`
(baseline). Attack IV, `combined`, reads the paper's groups together and is declared here.
`FeatureExtractor` computes any of them in one batched pass. Every feature is a (B,) tensor
named "<group>/<name>".
"""

from lightning_mia.attack.spec import AttackSpec, register_attack
from lightning_mia.features.extractor import FeatureExtractor, encoder_groups
from lightning_mia.features.groups import FEATURE_GROUPS, FeatureGroup, FeatureInputs

register_attack(
    AttackSpec(
        "combined",
        ("pixel", "semantic", "text", "quality"),
        "black-box",
        "attack IV: the features of attacks I, II and III together",
        paper=True,
    )
)

__all__ = [
    "FEATURE_GROUPS",
    "FeatureExtractor",
    "FeatureGroup",
    "FeatureInputs",
    "encoder_groups",
]
