"""All black-box features of a batch of queries, by group, in one pass.

    extractor = FeatureExtractor(load_encoder("runs/demo/encoder"), groups=["pixel", "semantic"])
    features = extractor(query, generated, captions)  # {"pixel/mse_mean": (B,), ...}

The B query images and the B*N generated images each go through the image encoder in one
batched call, the captions through the text encoder in one; only the embeddings the requested
groups need are computed. Everything runs on the device of the inputs, under `torch.no_grad()`.
`ATTACK_GROUPS` maps the attack names of ATTACKS.md to the feature groups they read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lightning_mia.features.blind import blind_features
from lightning_mia.features.pixel import check_pair, pixel_features
from lightning_mia.features.quality import quality_features
from lightning_mia.features.semantic import semantic_features
from lightning_mia.features.text import text_features

if TYPE_CHECKING:  # transformers is imported only by whoever builds the encoder
    from lightning_mia.models.encoder import ImageTextEncoder

FEATURE_GROUPS = ("pixel", "semantic", "text", "quality", "blind")
ENCODER_GROUPS = ("semantic", "text", "blind")  # groups that need the image-text encoder
ATTACK_GROUPS: dict[str, list[str]] = {
    "pixel": ["pixel"],  # attack I
    "semantic": ["semantic"],  # attack II
    "text": ["text", "quality"],  # attack III: caption faithfulness and image quality
    "combined": ["pixel", "semantic", "text", "quality"],  # attack IV
    "blind": ["blind"],  # baseline: no model queries
}


class FeatureExtractor(torch.nn.Module):
    """Computes the requested feature groups for (query, generated, captions) batches."""

    def __init__(
        self, encoder: ImageTextEncoder | None = None, groups: Sequence[str] = FEATURE_GROUPS
    ) -> None:
        """
        Args:
            encoder: the attacker's image-text encoder; needed by semantic, text and blind.
            groups: feature groups to compute, from `FEATURE_GROUPS`.
        """
        super().__init__()
        groups = list(dict.fromkeys(groups))
        unknown = sorted(set(groups) - set(FEATURE_GROUPS))
        if unknown:
            raise ValueError(f"unknown feature groups {unknown}; known: {list(FEATURE_GROUPS)}")
        needs = sorted(set(groups) & set(ENCODER_GROUPS))
        if needs and encoder is None:
            raise ValueError(f"feature groups {needs} need an image-text encoder; none was given")
        self.groups = groups
        self.encoder = encoder.eval() if encoder is not None and needs else None

    def _embed(self, query: torch.Tensor, generated: torch.Tensor, captions: list[str]) -> dict:
        """The embeddings the groups need: query (B, D), gen (B, N, D), text (B, D)."""
        enc = self.encoder
        if enc is None:
            return {}
        if enc.mean.device != query.device:
            enc.to(query.device)
        g = set(self.groups)
        emb = {"query": enc.embed_images(query)}
        if g & {"semantic", "text"}:
            b, n = generated.shape[:2]
            emb["gen"] = enc.embed_images(generated.flatten(0, 1)).view(b, n, -1)
        if g & {"text", "blind"}:
            emb["text"] = enc.embed_texts(captions)
        return emb

    @torch.no_grad()
    def forward(
        self, query: torch.Tensor, generated: torch.Tensor, captions: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Features of B queries: {"<group>/<name>": (B,) float32}.

        query: (B, 3, H, W) in [-1, 1]; generated: (B, N, 3, H', W') in [-1, 1], g_k = T(c);
        captions: the B captions c the images were generated from.
        """
        check_pair(query, generated)
        captions = list(captions)
        if len(captions) != len(query):
            raise ValueError(f"got {len(captions)} captions for {len(query)} query images")
        query, generated = query.float(), generated.float()
        emb = self._embed(query, generated, captions)
        out: dict[str, torch.Tensor] = {}
        if "pixel" in self.groups:
            out.update(pixel_features(query, generated))
        if "semantic" in self.groups:
            out.update(semantic_features(emb["query"], emb["gen"]))
        if "text" in self.groups:
            out.update(text_features(emb["text"], emb["query"], emb["gen"]))
        if "quality" in self.groups:
            out.update(quality_features(generated))
        if "blind" in self.groups:
            out.update(blind_features(query, emb["query"], emb["text"], captions))
        return {name: value.float() for name, value in out.items()}
