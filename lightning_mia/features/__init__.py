"""Black-box membership features: images and captions -> named per-sample scalars.

Groups (ATTACKS.md): `pixel` (attack I), `semantic` (II), `text` and `quality` (III), `blind`
(baseline); `FeatureExtractor` computes any of them in one batched pass, `ATTACK_GROUPS` maps
attack names to groups. Every feature is a (B,) tensor named "<group>/<name>".
"""

from lightning_mia.features.extractor import (
    ATTACK_GROUPS,
    ENCODER_GROUPS,
    FEATURE_GROUPS,
    FeatureExtractor,
)

__all__ = ["ATTACK_GROUPS", "ENCODER_GROUPS", "FEATURE_GROUPS", "FeatureExtractor"]
