"""All black-box features of a batch of queries, by group, in one pass.

    extractor = FeatureExtractor(load_encoder("runs/demo/encoder"), groups=["pixel", "semantic"])
    features = extractor(query, generated, captions)  # {"pixel/mse_mean": (B,), ...}

The B query images and the B*N generated images each go through the image encoder in one
batched call, the captions through the text encoder in one; only the embeddings the requested
groups need (`FeatureGroup.embeddings`) are computed. Everything runs on the device of the
inputs, under `torch.no_grad()`. The groups are those registered in `FEATURE_GROUPS` by the
feature modules imported below.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lightning_mia.features.groups import FEATURE_GROUPS, FeatureInputs
from lightning_mia.features.pixel import check_pair

if TYPE_CHECKING:  # transformers is imported only by whoever builds the encoder
    from lightning_mia.models.encoder import ImageTextEncoder


def encoder_groups(groups: Sequence[str]) -> list[str]:
    """The groups among `groups` that need the attacker's image-text encoder."""
    return [g for g in groups if FEATURE_GROUPS[g].needs_encoder]


class FeatureExtractor(torch.nn.Module):
    """Computes the requested feature groups for (query, generated, captions) batches."""

    def __init__(
        self, encoder: ImageTextEncoder | None = None, groups: Sequence[str] | None = None
    ) -> None:
        """
        Args:
            encoder: the attacker's image-text encoder; needed by semantic, text and blind.
            groups: feature groups to compute (names of `FEATURE_GROUPS`); None = all.
        """
        super().__init__()
        groups = list(dict.fromkeys(FEATURE_GROUPS.names() if groups is None else groups))
        problems = FEATURE_GROUPS.check(groups)
        if problems:
            raise ValueError(problems[0])
        needs = sorted(encoder_groups(groups))
        if needs and encoder is None:
            raise ValueError(f"feature groups {needs} need an image-text encoder; none was given")
        self.groups = groups
        self.embeddings = {e for g in groups for e in FEATURE_GROUPS[g].embeddings}
        self.encoder = encoder.eval() if encoder is not None and needs else None

    def _embed(
        self, query: torch.Tensor, generated: torch.Tensor, captions: list[str]
    ) -> dict[str, torch.Tensor]:
        """The embeddings the groups need: query (B, D), generated (B, N, D), text (B, D)."""
        enc = self.encoder
        if enc is None:
            return {}
        if enc.mean.device != query.device:
            enc.to(query.device)
        emb = {"query": enc.embed_images(query)}
        if "generated" in self.embeddings:
            b, n = generated.shape[:2]
            emb["generated"] = enc.embed_images(generated.flatten(0, 1)).view(b, n, -1)
        if "text" in self.embeddings:
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
        inputs = FeatureInputs(query, generated, captions, self._embed(query, generated, captions))
        out: dict[str, torch.Tensor] = {}
        for group in self.groups:
            out.update(FEATURE_GROUPS[group].compute(inputs))
        return {name: value.float() for name, value in out.items()}
