"""Attack II: semantic distance between the query image x and each generated image g_k.

    semantic_features(query_emb, gen_emb)  # (B, D), (B, N, D) -> 8 features (B,)

Embeddings come from the attacker's image encoder E (`ImageTextEncoder.embed_images`); they are
L2-normalised here again, so any encoder output works. Per k: cosine similarity and L2 distance
between E(x) and E(g_k); aggregated over k as mean, min, max, std. On unit vectors the L2
distance is sqrt(2 - 2 cos): both are kept, as the paper's attack lists both.

LiRA calibrates `semantic/cos_max`, the closest generated image in embedding space (the same
"one of N reproduces it" reading as the pixel attack's; the L2 distance would be its monotone
transform).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_mia.features.groups import FeatureGroup, register_group
from lightning_mia.features.pixel import aggregate_over_images
from lightning_mia.specs.attacks import AttackSpec, register_attack


def check_embeddings(query_emb: torch.Tensor, gen_emb: torch.Tensor) -> None:
    """One clear error for (B, D) / (B, N, D) embeddings that do not match."""
    if query_emb.ndim != 2 or gen_emb.ndim != 3 or query_emb.shape[0] != gen_emb.shape[0]:
        raise ValueError(
            "expected query embeddings (B, D) and generated embeddings (B, N, D), got "
            f"{tuple(query_emb.shape)} and {tuple(gen_emb.shape)}"
        )
    if query_emb.shape[-1] != gen_emb.shape[-1]:
        raise ValueError(f"embedding sizes differ: {query_emb.shape[-1]} vs {gen_emb.shape[-1]}")


@torch.no_grad()
def semantic_features(query_emb: torch.Tensor, gen_emb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cosine and L2 distance between E(x) and each E(g_k), aggregated over k.

    query_emb: (B, D); gen_emb: (B, N, D). Names: `semantic/{cos,l2}_{mean,min,max,std}`.
    """
    check_embeddings(query_emb, gen_emb)
    q = F.normalize(query_emb.float(), dim=-1)[:, None]  # (B, 1, D)
    g = F.normalize(gen_emb.float(), dim=-1)  # (B, N, D)
    cos = (q * g).sum(-1)  # (B, N)
    l2 = (q - g).norm(dim=-1)  # (B, N)
    return {
        **aggregate_over_images(cos, "semantic/cos"),
        **aggregate_over_images(l2, "semantic/l2"),
    }


register_group(
    FeatureGroup(
        "semantic",
        lambda x: semantic_features(x.embeddings["query"], x.embeddings["generated"]),
        embeddings=("query", "generated"),
    )
)
register_attack(
    AttackSpec(
        "semantic",
        ("semantic",),
        "black-box",
        "attack II: cosine and L2 distance of image embeddings of query and generated images",
        score_feature="semantic/cos_max",
        paper=2,
        score_scale="identity",  # a cosine, bounded and not skewed like an error
    )
)
