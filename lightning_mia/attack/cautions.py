"""What a report must say besides its numbers: an external target's provenance, and the
pretrained components that may have seen members and non-members alike.

    report = annotate_report(report, card, layout, encoder="/models/clip")

A component trained outside the experiment (a base Stable Diffusion, its VAE, a DALL-E mini
VQGAN imported from taming, a pretrained BART, a CLIP or BLIP folder) was trained on data the
audit does not control, possibly on the very images of both classes: what it memorised moves
members and non-members alike, so the figures measure what the target's own training added on
top of it, not the exposure of the pretrained component itself. Components the experiment
trained (folders inside it with a DONE marker, on its public or auxiliary pool) are not named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lightning_mia.attack.report import AttackReport
from lightning_mia.card import RunCard
from lightning_mia.models.base import FAMILIES
from lightning_mia.paths import ExperimentLayout, done_marker


def autoencoder_what(family: str) -> str:
    """What a family's frozen image model is called in a report ("VQGAN image tokenizer")."""
    cls = FAMILIES.get(family)
    return cls.autoencoder_what if cls is not None else "autoencoder"


def trained_here(folder: str, layout: ExperimentLayout) -> bool:
    """True for a folder a stage of this experiment trained (inside it, with a DONE marker)."""
    path, root = Path(folder).resolve(), layout.root.resolve()
    return path.is_relative_to(root) and done_marker(path).is_file()


def pretrained_components(
    card: RunCard, layout: ExperimentLayout, encoder: str = "", captioner: str = ""
) -> list[str]:
    """'what (folder)' for each component of the target's report trained outside it."""
    found = []
    base = card.base
    if base.get("path"):
        found.append(f"base model {base['path']} (sha256 {base['sha256'][:12]})")
    if card.autoencoder and not base and not trained_here(card.autoencoder, layout):
        found.append(f"{autoencoder_what(card.family)} {card.autoencoder}")
    if card.text_init:
        found.append(f"pretrained BART text side {card.text_init}")
    if encoder and not trained_here(encoder, layout):
        found.append(f"CLIP encoder {encoder} (semantic and text attacks)")
    if captioner and not trained_here(captioner, layout):
        found.append(f"captioner {captioner}")
    return found


def external_note(facts: dict[str, Any]) -> str:
    """One line: what was given for an external target."""

    def named(key: str) -> str:
        return f"{facts[key]} (sha256 {facts[key + '_sha256'][:12]})"

    given = [f"pipeline {named('pipeline')}"]
    if facts.get("lora"):
        given.append(f"LoRA adapter {named('lora')}")
    given.append(f"members {facts['members']}, non-members {facts['non_members']}")
    return (
        f"external target: {'; '.join(given)}; shadows fine-tuned the same way from {named('base')}"
    )


def annotate_report(
    report: AttackReport,
    card: RunCard,
    layout: ExperimentLayout,
    encoder: str = "",
    captioner: str = "",
) -> AttackReport:
    """Add the external target's facts (report.json `target.external` and a note) and the
    caution about pretrained components to `report.notes`; returns the report."""
    external = card.external
    if external:
        report.target["external"] = dict(external)
        report.notes.append(external_note(external))
    components = pretrained_components(card, layout, encoder, captioner)
    if components:
        report.notes.append(
            "caution: trained outside this experiment, possibly on members and non-members "
            f"alike: {'; '.join(components)}. What they memorised moves both classes, so the "
            "figures measure what the target's own training added, not their exposure"
        )
    return report
