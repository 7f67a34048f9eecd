"""Loading any family module from its checkpoint, by reading the run card first.

The families themselves are registered by their modules (`models.base.FAMILIES`,
`@register_family("diffusion")` in `models/diffusion.py`) and found by name.
"""

from __future__ import annotations

import os

from lightning_mia.card import CheckpointError, load_module, read_card_and_moves
from lightning_mia.models.base import FAMILIES, TextToImageModule


def family_class(family: str) -> type[TextToImageModule]:
    """The LightningModule class of a family name."""
    if family not in FAMILIES:
        raise CheckpointError(
            f"family {family!r} is not a text-to-image family (known: {FAMILIES.names()})"
        )
    return FAMILIES[family]


def load_family_module(
    ckpt_path: str | os.PathLike, map_location: str = "cpu"
) -> TextToImageModule:
    """Rebuild the trained model of a lightning_mia checkpoint, in eval mode."""
    card, moves = read_card_and_moves(ckpt_path)
    cls = family_class(card.family)
    # folders that moved with a copied experiment replace those the hyper-parameters name
    model = load_module(cls, ckpt_path, map_location=map_location, weights_only=True, **moves)
    model.card = card
    return model.eval()
