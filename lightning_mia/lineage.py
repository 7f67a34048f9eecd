"""W&B lineage of an experiment: which files make up each stage's artifact, and what each stage
used. Plain descriptions (`ArtifactSpec`); `reporting.log_lineage` turns them into W&B Artifacts.

    used, made = fit_lineage(layout, stage, ckpt)   # a training stage, after fit
    log_lineage(trainer.logger, used, made)

Artifacts, named `<experiment>-<stage>` (the experiment folder's name, as the W&B group):

| artifact | type | files | made by | used by |
|---|---|---|---|---|
| `<exp>-splits` | splits | splits.json | (first stage) | every stage |
| `<exp>-autoencoder` | autoencoder | the folder's files | autoencoder stage | model stages |
| `<exp>-encoder` | encoder | the folder's files | encoder stage | queries |
| `<exp>-<run>` | model | card.json, checkpoints/last.ckpt | model stage | queries |
| `<exp>-query-<run>` | query | the shards folder | the query | attack (re-runs) |
| `<exp>-report[-<setting>]` | report | report.json/.md, PNGs | attack | |

A checkpoint enters as a `file://` reference (path and checksum; no upload of gigabytes) unless
`upload_checkpoint`; everything else is uploaded. An artifact declared as used is built from
the same files as the one made, so W&B finds the same version (same digest) and links the runs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_mia.card import RunCard, read_card
from lightning_mia.paths import SHARED_STAGES, ExperimentLayout, StagePaths, last_checkpoint

SPLITS_SUMMARY_KEYS = ("hash", "seed", "format", "config")


@dataclass
class ArtifactSpec:
    """One W&B artifact: its files (name in the artifact -> local path) and references."""

    name: str
    type: str
    files: dict[str, Path] = field(default_factory=dict)
    references: dict[str, Path] = field(default_factory=dict)  # checksummed, not uploaded
    contents: dict[str, bytes] = field(default_factory=dict)  # small files made in memory
    metadata: dict[str, Any] = field(default_factory=dict)


def artifact_name(experiment: ExperimentLayout, stage: str) -> str:
    """`<experiment>-<stage>`, with only the characters W&B allows in artifact names."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{experiment.name}-{stage}")


def _top_files(folder: Path) -> dict[str, Path]:
    """The files directly in `folder` (not its checkpoints/ or wandb/ subfolders)."""
    if not folder.is_dir():
        return {}
    return {
        p.name: p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")
    }


def splits_summary(layout: ExperimentLayout) -> dict[str, Any]:
    """What a run's config records of the splits: hash, seed, settings, data source."""
    if not layout.splits.is_file():
        return {}
    doc = json.loads(layout.splits.read_text(encoding="utf-8"))
    summary = {k: doc[k] for k in SPLITS_SUMMARY_KEYS if k in doc}
    dataset = doc.get("dataset", {})
    summary["dataset"] = {
        k: dataset[k] for k in ("source", "num_samples", "fingerprint") if k in dataset
    }
    return summary


def splits_artifact(layout: ExperimentLayout) -> list[ArtifactSpec]:
    """The splits.json artifact (none before the splits exist)."""
    if not layout.splits.is_file():
        return []
    summary = splits_summary(layout)
    return [
        ArtifactSpec(
            artifact_name(layout, "splits"),
            "splits",
            {"splits.json": layout.splits},
            metadata=summary,
        )
    ]


def folder_artifact(layout: ExperimentLayout, folder: Path, kind: str) -> list[ArtifactSpec]:
    """A shared stage's folder (autoencoder/, encoder/): its top-level files."""
    files = _top_files(folder)
    if not files:
        return []
    return [ArtifactSpec(artifact_name(layout, kind), kind, files)]


def model_artifact(
    ckpt: str | Path, upload_checkpoint: bool = False, card: RunCard | None = None
) -> list[ArtifactSpec]:
    """A text-to-image model: its run card (card.json) and its checkpoint."""
    ckpt = Path(ckpt)
    card = card or read_card(ckpt)
    layout = ExperimentLayout(card.experiment)
    spec = ArtifactSpec(artifact_name(layout, card.run_name), "model", metadata=card.to_dict())
    spec.contents["card.json"] = (
        json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n"
    ).encode()
    (spec.files if upload_checkpoint else spec.references)[f"checkpoints/{ckpt.name}"] = ckpt
    return [spec]


def _experiment_folder(
    layout: ExperimentLayout, folder: str | Path, kind: str
) -> list[ArtifactSpec]:
    """The artifact of an experiment's own autoencoder/ or encoder/ (none for outside ones)."""
    folder = Path(folder) if folder else None
    own = layout.root / kind
    if folder is None or not folder.is_dir() or folder.resolve() != own.resolve():
        return []
    return folder_artifact(layout, own, kind)


def fit_lineage(
    layout: ExperimentLayout, stage: StagePaths, autoencoder: str = "", upload: bool = False
) -> tuple[list[ArtifactSpec], list[ArtifactSpec]]:
    """(used, made) of a finished training stage: splits (+ the autoencoder it trained on);
    the shared stage's folder or the model's card and checkpoint."""
    used = [*splits_artifact(layout), *_experiment_folder(layout, autoencoder, "autoencoder")]
    shared = {folder: kind for kind, (folder, _) in SHARED_STAGES.items()}
    if stage.name in shared:
        return used, folder_artifact(layout, stage.folder, shared[stage.name])
    ckpt = last_checkpoint(stage.folder)
    return used, model_artifact(ckpt, upload) if ckpt.is_file() else []


def query_lineage(
    ckpt: str | Path, query_folder: Path, encoder: str | Path | None, queried_now: bool
) -> tuple[list[ArtifactSpec], list[ArtifactSpec]]:
    """(used, made) of a query: splits, the model, the experiment's encoder; the shards are
    made when this run queried, used when it read a complete folder."""
    card = read_card(ckpt)
    layout = ExperimentLayout(card.experiment)
    used = [*splits_artifact(layout), *model_artifact(ckpt, card=card)]
    used += _experiment_folder(layout, encoder or "", "encoder")
    name = artifact_name(layout, f"query-{card.run_name}")
    files = _top_files(query_folder)
    shards = ArtifactSpec(name, "query", files, metadata={"run_name": card.run_name})
    return (used, [shards]) if queried_now else ([*used, shards], [])


def report_artifact(folder: Path, experiment: str, setting: str) -> ArtifactSpec:
    """The attack report folder's files (report.json, report.md, roc.png, examples.png...)."""
    suffix = "report" if setting == "shadow" else f"report-{setting}"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{experiment}-{suffix}")
    return ArtifactSpec(name, "report", _top_files(folder), metadata={"setting": setting})
