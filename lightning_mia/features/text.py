"""Attack III: how faithful the generated images are to the caption c.

    text_features(text_emb, query_emb, gen_emb)  # (B, D), (B, D), (B, N, D) -> 5 features (B,)

Per k: cosine(E_txt(c), E_img(g_k)), aggregated over k (mean, min, max, std); and
cosine(E_txt(c), E_img(x)), the same score of the query image itself, a reference for how well
the encoder matches this caption at all. ATTACKS.md puts the quality of g_k under attack III too:
that is its own group, `quality/*` (lightning_mia.features.quality), which the `text` attack
includes (`ATTACKS["text"].groups == ("text", "quality")`), so each group stays one concept.

LiRA calibrates `text/gen_cos_mean`: faithfulness to the caption is a property of every
generation, not of the closest one, and the mean over N is the least noisy of the statistics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_mia.features.groups import FeatureGroup, register_group
from lightning_mia.features.pixel import aggregate_over_images
from lightning_mia.features.semantic import check_embeddings
from lightning_mia.specs.attacks import AttackSpec, register_attack


@torch.no_grad()
def text_features(
    text_emb: torch.Tensor, query_emb: torch.Tensor, gen_emb: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Caption-image cosine of each g_k (aggregated) and of the query image.

    text_emb, query_emb: (B, D); gen_emb: (B, N, D).
    Names: `text/gen_cos_{mean,min,max,std}`, `text/query_cos`.
    """
    check_embeddings(query_emb, gen_emb)
    check_embeddings(text_emb, gen_emb)
    t = F.normalize(text_emb.float(), dim=-1)  # (B, D)
    g = F.normalize(gen_emb.float(), dim=-1)  # (B, N, D)
    q = F.normalize(query_emb.float(), dim=-1)  # (B, D)
    gen_cos = (t[:, None] * g).sum(-1)  # (B, N)
    return {**aggregate_over_images(gen_cos, "text/gen_cos"), "text/query_cos": (t * q).sum(-1)}


register_group(
    FeatureGroup(
        "text",
        lambda x: text_features(
            x.embeddings["text"], x.embeddings["query"], x.embeddings["generated"]
        ),
        embeddings=("query", "generated", "text"),
    )
)
register_attack(
    AttackSpec(
        "text",
        ("text", "quality"),
        "black-box",
        "attack III: caption-image cosine of each generated image and of the query; "
        "no-reference quality (BRISQUE) of the generated images",
        score_feature="text/gen_cos_mean",
        paper=3,
        score_scale="identity",  # a mean cosine, bounded and not skewed like an error
    )
)
