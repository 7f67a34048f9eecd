"""Black-box membership features: images and captions -> named per-sample scalars.

Groups (ATTACKS.md), each registered in `FEATURE_GROUPS` by its module (named after the group)
together with the attack that reads it: `pixel` (attack I), `semantic` (II), `text` and
`quality` (III), `blind` (baseline); attack IV, `combined`, reads the paper's groups together
(`features/combined.py`). `FeatureExtractor` computes any of them in one batched pass. Every
feature is a (B,) tensor named "<group>/<name>".
"""

from lightning_mia.features.extractor import FeatureExtractor, encoder_groups
from lightning_mia.features.groups import FEATURE_GROUPS, FeatureGroup, FeatureInputs

__all__ = [
    "FEATURE_GROUPS",
    "FeatureExtractor",
    "FeatureGroup",
    "FeatureInputs",
    "encoder_groups",
]
