"""The blind baseline: features of the query (x, c) alone, without querying any model.

    blind_features(query, query_emb, text_emb, captions)  # -> {"blind/...": (B,)}

Members and non-members are drawn IID from one pool, so a classifier on these features should
sit at chance; if it does not, the split leaks (distribution shift) and every other attack's
number is inflated by as much. The runner cross-validates it on the target's own rows
(`lightning_mia.attack.blind`), a diagnostic of the benchmark. Features:
- `blind/query_cos`: cosine(E_txt(c), E_img(x)), how well the encoder matches the pair;
- `blind/{mean,std}_{r,g,b}`: per-channel mean and std of x in [-1, 1];
- `blind/hf_energy`: mean squared Laplacian of the luminance, high-frequency content;
- `blind/img_emb_{i}`, `blind/txt_emb_{i}` for i < D: every coordinate of the unit-norm image
  and text embeddings (D = the encoder's projection size: 64 for the tiny encoder, 512 for
  CLIP ViT-B/32). They are stored whole because a shift can lie in any direction of the encoder
  space (the first 4 coordinates saw a random 4/D of it); the diagnostic reduces them to a few
  principal components fitted on its training folds, which a classifier on a few hundred rows
  can use, and nothing is fixed here that only the attack stage can choose;
- `blind/caption_chars`, `blind/caption_words`: caption length (when captions are given).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_mia.features.groups import FeatureGroup, register_group
from lightning_mia.specs.attacks import AttackSpec, register_attack

EMBEDDING_PREFIXES = ("blind/img_emb_", "blind/txt_emb_")  # one feature per coordinate
CHANNELS = ("r", "g", "b")
LUMA = (0.299, 0.587, 0.114)


def image_statistics(query: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-channel mean/std and high-frequency energy of (B, 3, H, W) images in [-1, 1]."""
    x = query.float()
    out: dict[str, torch.Tensor] = {}
    for i, c in enumerate(CHANNELS):
        out[f"blind/mean_{c}"] = x[:, i].mean(dim=(1, 2))
        out[f"blind/std_{c}"] = x[:, i].std(dim=(1, 2), correction=0)
    luma = torch.einsum("bchw,c->bhw", x, torch.tensor(LUMA, device=x.device))[:, None]
    laplace = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], device=x.device)
    hf = F.conv2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), laplace.view(1, 1, 3, 3))
    out["blind/hf_energy"] = hf.square().mean(dim=(1, 2, 3))
    return out


@torch.no_grad()
def blind_features(
    query: torch.Tensor,
    query_emb: torch.Tensor,
    text_emb: torch.Tensor,
    captions: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Features of the query image and caption alone (see the module docstring for names).

    query: (B, 3, H, W) in [-1, 1]; query_emb, text_emb: (B, D); captions: B strings or None.
    """
    if query.ndim != 4 or query_emb.shape != text_emb.shape or len(query) != len(query_emb):
        raise ValueError(
            "expected query (B, 3, H, W), query_emb and text_emb (B, D), got "
            f"{tuple(query.shape)}, {tuple(query_emb.shape)}, {tuple(text_emb.shape)}"
        )
    q = F.normalize(query_emb.float(), dim=-1)
    t = F.normalize(text_emb.float(), dim=-1)
    out = {"blind/query_cos": (q * t).sum(-1), **image_statistics(query)}
    for prefix, emb in zip(EMBEDDING_PREFIXES, (q, t)):
        out.update({f"{prefix}{i}": emb[:, i] for i in range(emb.shape[-1])})  # (B,) each
    if captions is not None:
        if len(captions) != len(query):
            raise ValueError(f"got {len(captions)} captions for {len(query)} query images")
        dev = query.device
        out["blind/caption_chars"] = torch.tensor([float(len(c)) for c in captions], device=dev)
        out["blind/caption_words"] = torch.tensor(
            [float(len(c.split())) for c in captions], device=dev
        )
    return out


register_group(
    FeatureGroup(
        "blind",
        lambda x: blind_features(x.query, x.embeddings["query"], x.embeddings["text"], x.captions),
        embeddings=("query", "text"),
    )
)
register_attack(
    AttackSpec(
        "blind",
        ("blind",),
        "none",
        "diagnostic: a classifier on the query image and caption alone (no model queries), "
        "cross-validated on the target's rows: exposes member/non-member distribution shift",
        baseline=True,
    )
)
