"""How good a captioner's captions are: BLEU-4, and on shapes data whether they name the objects.

    quality = CaptionQuality()                 # a torchmetrics Metric: sums over batches and ranks
    quality.update(predicted, ground_truth)    # two lists of B strings
    quality.compute()  # {"bleu": 0.71, "shapes_colours": 0.8, "exact": 0.6, "colours": 0.9, ...}

BLEU-4 is torchmetrics' `SacreBLEUScore` (13a tokenisation, lower-cased): one reference per image,
corpus-level. The shapes scores read captions of the embedded procedural data
(`lightning_mia.data.shapes`: "a big red circle at the top left and a small blue star in the
center", 1-3 objects joined by ", " and " and "):

- `shapes_colours`: share of captions whose multiset of (colour, shape) pairs is the ground
  truth's — the objects named right, their sizes and places aside;
- `exact`: share whose multiset of whole objects (size, colour, shape, place) is the truth's;
- `colours`, `count`: share with the right multiset of colours, the right number of objects;
- `shapes_parsed`: share of predicted captions that follow the grammar at all.

They are reported only when every ground-truth caption seen parses as a shapes caption (any
other data set, e.g. COCO, gives BLEU alone); a prediction that does not parse counts as wrong.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
from torchmetrics import Metric
from torchmetrics.text import SacreBLEUScore

from lightning_mia.data.shapes import COLOURS, PLACES, SHAPES, SIZES

_ALTERNATIVES = {  # longest first, so "at the top left" wins over "at the top"
    "size": sorted(SIZES, key=len, reverse=True),
    "colour": sorted(COLOURS, key=len, reverse=True),
    "shape": sorted(SHAPES, key=len, reverse=True),
    "place": sorted(PLACES, key=len, reverse=True),
}
_PHRASE = re.compile(
    r"a (?P<size>{size}) (?P<colour>{colour}) (?P<shape>{shape}) (?P<place>{place})".format(
        **{k: "|".join(map(re.escape, v)) for k, v in _ALTERNATIVES.items()}
    )
)
_SEPARATOR = re.compile(r"\s*,\s*|\s+and\s+")


@dataclass(frozen=True, order=True)
class ShapeMention:
    """One object a shapes caption names."""

    size: str
    colour: str
    shape: str
    place: str


def parse_shapes_caption(text: str) -> tuple[ShapeMention, ...] | None:
    """The objects a shapes caption names, sorted; None if `text` does not follow the grammar.

    Tolerant of case, surrounding space and space before commas (as tokenizers decode them).
    """
    phrases = _SEPARATOR.split(" ".join(text.lower().split()))
    mentions = []
    for phrase in phrases:
        match = _PHRASE.fullmatch(phrase)
        if match is None:
            return None
        mentions.append(ShapeMention(**match.groupdict()))
    return tuple(sorted(mentions))


def _colour_shapes(mentions: tuple[ShapeMention, ...]) -> Counter:
    return Counter((m.colour, m.shape) for m in mentions)


class CaptionQuality(Metric):
    """Corpus BLEU-4 of predicted captions against one reference each, plus the shapes scores.

    States are sums, so `compute()` gathers every rank's captions under DDP.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self) -> None:
        super().__init__()
        self.bleu = SacreBLEUScore(n_gram=4, tokenize="13a", lowercase=True)
        for name in (
            "total",
            "not_shapes",
            "parsed",
            "right_count",
            "right_colours",
            "right_colour_shapes",
            "right_exact",
        ):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: list[str], targets: list[str]) -> None:
        """Add B predicted captions and their B ground-truth captions."""
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predicted captions for {len(targets)} references")
        self.bleu.update(list(preds), [[t] for t in targets])
        for pred, target in zip(preds, targets):
            self.total += 1
            truth = parse_shapes_caption(target)
            if truth is None:
                self.not_shapes += 1
                continue
            got = parse_shapes_caption(pred)
            if got is None:
                continue
            self.parsed += 1
            self.right_count += int(len(got) == len(truth))
            self.right_colours += int(
                sorted(m.colour for m in got) == sorted(m.colour for m in truth)
            )
            self.right_colour_shapes += int(_colour_shapes(got) == _colour_shapes(truth))
            self.right_exact += int(got == truth)

    def compute(self) -> dict[str, torch.Tensor]:
        """{"bleu"} and, if every reference was a shapes caption, the shapes shares."""
        out = {"bleu": self.bleu.compute()}
        if self.total > 0 and self.not_shapes == 0:
            n = self.total.float()
            out["shapes_parsed"] = self.parsed / n
            out["count"] = self.right_count / n
            out["colours"] = self.right_colours / n
            out["shapes_colours"] = self.right_colour_shapes / n
            out["exact"] = self.right_exact / n
        return out

    def reset(self) -> None:
        super().reset()
        self.bleu.reset()
