"""Weights & Biases: the loggers of every stage and what they log. The only module that imports
`wandb` (lazily, inside functions).

Every helper takes a Lightning logger and is a no-op for anything but a `WandbLogger`, so
callers never branch. `make_logger` picks online or offline from the environment (offline when
no API key is configured, `WANDB_MODE=disabled` turns W&B off); it runs silently unless the
terminal is verbose (`lightning_mia.terminal`). `log_lineage` logs the artifacts that
`lightning_mia.lineage` describes, also offline.
"""

from __future__ import annotations

import io
import netrc
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_mia.lineage import ArtifactSpec, report_artifact
from lightning_mia.terminal import is_verbose

WANDB_HOST = "api.wandb.ai"


def _wandb_loggers(logger: Any) -> list[Any]:
    """The WandbLoggers among `logger` (a logger, a list of them, or None)."""
    loggers = logger if isinstance(logger, (list, tuple)) else [logger]
    if all(lg is None for lg in loggers):
        return []
    from lightning.pytorch.loggers import WandbLogger

    return [lg for lg in loggers if isinstance(lg, WandbLogger)]


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) in [-1, 1] -> (..., H, W, 3) uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def _row_of(generated: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) -> one (H, N*W, 3) uint8 strip."""
    return np.concatenate(list(_to_uint8(generated)), axis=1)


def grid_png(images: torch.Tensor, min_side: int = 96) -> bytes:
    """(B, N, 3, H, W) in [-1, 1] -> PNG bytes of a B x N grid (row b = images[b]); small
    images are enlarged (nearest neighbour, whole factors) to about `min_side` pixels."""
    from PIL import Image

    grid = np.concatenate([_row_of(images[b]) for b in range(images.shape[0])], axis=0)
    factor = max(1, min_side // int(images.shape[-2]))
    grid = grid.repeat(factor, axis=0).repeat(factor, axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(grid)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class RunResults:
    """What a stage's results are in W&B: tables, images, summary scalars and its folder (a
    report artifact). The attack stage builds one from its report (`attack.render`)."""

    tables: dict[str, tuple[list[str], list[list[Any]]]] = field(default_factory=dict)
    images: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)  # paths, captions
    summary: dict[str, Any] = field(default_factory=dict)  # scalars (and decisions)
    folder: Path | None = None  # the report folder, logged as the stage's artifact
    setting: str = ""


def log_results(logger: Any, results: RunResults) -> None:
    """Log a stage's result tables, images, summary scalars and report folder to W&B."""
    for lg in _wandb_loggers(logger):
        for key, (columns, data) in results.tables.items():
            lg.log_table(key, columns=columns, data=data)
        for key, (paths, captions) in results.images.items():
            extra = {"caption": list(captions)} if captions else {}
            lg.log_image(key, list(paths), **extra)
        lg.experiment.summary.update({k: v for k, v in results.summary.items() if v is not None})
        if results.folder is not None:
            group = lg.experiment.group or "experiment"
            log_lineage(lg, [], [report_artifact(results.folder, group, results.setting)])


def log_image_grid(
    logger: Any,
    key: str,
    images: torch.Tensor,
    captions: Sequence[str],
    step: int | None = None,
) -> None:
    """Log images (B, N, 3, H, W) in [-1, 1] as B captioned strips of N images."""
    for lg in _wandb_loggers(logger):
        strips = [_row_of(images[b]) for b in range(images.shape[0])]
        lg.log_image(key, strips, step=step, caption=list(captions))


def log_query_table(
    logger: Any,
    queries: torch.Tensor,
    generated: torch.Tensor,
    captions: Sequence[str],
    is_member: torch.Tensor,
) -> None:
    """A W&B table: caption, membership, query image (B, 3, H, W), generations (B, N, 3, H, W)."""
    loggers = _wandb_loggers(logger)
    if not loggers:
        return
    import wandb

    query_images = _to_uint8(queries)  # (B, H, W, 3)
    data = [
        [
            captions[b],
            bool(is_member[b]),
            wandb.Image(query_images[b]),
            wandb.Image(_row_of(generated[b])),
        ]
        for b in range(queries.shape[0])
    ]
    for lg in loggers:
        lg.log_table("query/examples", ["caption", "is_member", "query", "generated"], data)


def log_feature_histograms(
    logger: Any, features: Mapping[str, torch.Tensor], is_member: torch.Tensor
) -> None:
    """Member and non-member histograms of every feature (S,), under `features/<name>/...`."""
    loggers = _wandb_loggers(logger)
    if not loggers:
        return
    import wandb

    member = torch.as_tensor(is_member).bool()
    logged = {}
    for name, values in features.items():
        values = values.detach().float().cpu()
        for label, mask in (("member", member), ("non_member", ~member)):
            finite = values[mask][torch.isfinite(values[mask])]
            if finite.numel():
                logged[f"features/{name}/{label}"] = wandb.Histogram(finite.numpy())
    for lg in loggers:
        lg.experiment.log(logged)


def finish_wandb_run() -> None:
    """End the active W&B run (if any), so the next stage in this process starts its own."""
    run = sys.modules["wandb"].run if "wandb" in sys.modules else None
    if run is not None:
        run.finish()


def has_wandb_api_key() -> bool:
    """Whether W&B credentials are configured (WANDB_API_KEY or a ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", f"https://{WANDB_HOST}").split("//")[-1].rstrip("/")
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """ "disabled", "offline" (no key, or WANDB_MODE says so) or "online"."""
    env = os.environ.get("WANDB_MODE", "").lower()
    if env == "disabled":
        return "disabled"
    if env in ("offline", "dryrun") or not has_wandb_api_key():
        return "offline"
    return "online"


def wandb_mode_note(save_dir: str | os.PathLike | None = None) -> str | None:
    """The `wandb sync <dir>` hint when W&B ran offline; None when online or disabled."""
    if wandb_mode() != "offline":
        return None
    run = sys.modules["wandb"].run if "wandb" in sys.modules else None
    if run is not None and getattr(run, "dir", None):
        target = str(Path(run.dir).parent)
    else:
        target = str(Path(save_dir or ".") / "wandb" / "offline-run-*")
    return f"W&B ran offline; upload the run with: wandb sync {target}"


def offline_run_folders(root: str | os.PathLike) -> list[Path]:
    """The offline runs of an experiment (its stages', queries' and attacks'), oldest first."""
    root = Path(root)
    found = [
        *root.glob("wandb/offline-run-*"),
        *root.glob("*/wandb/offline-run-*"),
        *root.glob("queries/*/wandb/offline-run-*"),
    ]
    return sorted(found, key=_run_started)


def _run_started(folder: Path) -> tuple[str, str]:
    """When an offline run started, to the millisecond: the first line of its debug log
    ("2026-12-01 10:43:11,327 INFO ..."), else the second its folder name gives."""
    try:
        with open(folder / "logs" / "debug.log", encoding="utf-8") as log:
            first = log.readline()[:23]
    except OSError:
        first = ""
    return first, folder.name  # offline-run-<YYYYmmdd_HHMMSS>-<id>


def make_logger(
    experiment_dir: str | os.PathLike,
    name: str,
    job_type: str,
    group: str,
    offline: bool | None = None,
    project: str = "lightning_mia",
    config: Mapping[str, Any] | None = None,
) -> Any:
    """A `WandbLogger` writing under `<experiment_dir>/wandb/`, offline when no key is set.

    `offline=None` decides from the environment (`wandb_mode()`); WANDB_MODE=disabled always
    wins, so tests never create runs. `config` starts the run's config. Unless the terminal is
    verbose, W&B prints nothing (no banner, no summary sparklines, no captured console).
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode()
    if mode != "disabled" and offline is not None:
        mode = "offline" if offline else "online"
    save_dir = Path(experiment_dir)  # created by W&B when the run starts, not before: a stage
    # that fails on its input (bad data, bad config) leaves no folder behind
    extra: dict[str, Any] = {"config": dict(config)} if config else {}
    if not is_verbose():
        import wandb

        extra["settings"] = wandb.Settings(console="off", quiet=True, silent=True)
    logger = WandbLogger(
        name=name,
        project=project,
        save_dir=str(save_dir),
        job_type=job_type,
        group=group,
        mode=mode,
        **extra,
    )
    # Lightning passes `anonymous=None`, a setting W&B has deprecated (it warns on any value);
    # unset, W&B behaves the same and says nothing
    getattr(logger, "_wandb_init", {}).pop("anonymous", None)
    return logger


def _active_runs(logger: Any) -> list[Any]:
    """The live (not disabled) W&B runs of `logger`, on global rank zero only."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return []
    runs = [lg.experiment for lg in _wandb_loggers(logger)]
    return [r for r in runs if not getattr(r, "disabled", True) and hasattr(r, "log_artifact")]


def has_wandb_run(logger: Any) -> bool:
    """Whether `logger` has a live W&B run here (so lineage is worth describing)."""
    return bool(_active_runs(logger))


def log_config(logger: Any, config: Mapping[str, Any]) -> None:
    """Add `config` (nested dicts) to the W&B run's config."""
    for run in _active_runs(logger):
        run.config.update(dict(config), allow_val_change=True)


def _build_artifact(spec: ArtifactSpec, scratch: Path) -> Any:
    import wandb

    artifact = wandb.Artifact(spec.name, type=spec.type, metadata=dict(spec.metadata))
    for name, path in spec.files.items():
        artifact.add_file(str(path), name=name)  # "mutable": copied to W&B's staging now
    for name, data in spec.contents.items():
        (scratch / name).write_bytes(data)
        artifact.add_file(str(scratch / name), name=name)
    for name, path in spec.references.items():
        artifact.add_reference(Path(path).resolve().as_uri(), name=name)
    return artifact


_DECLARED: dict[str, set[tuple[str, str]]] = {}  # run id -> (artifact, "used" | "made") done


def log_lineage(logger: Any, used: Sequence[ArtifactSpec], made: Sequence[ArtifactSpec]) -> None:
    """Declare the artifacts a stage used (inputs) and log those it made (outputs), each once
    per run.

    Online, inputs go through `run.use_artifact`; offline (where `use_artifact` refuses) they
    are logged with `use_after_commit`, which is what `use_artifact` does with a new artifact
    online, so `wandb sync` links them as inputs all the same.
    """
    for run in _active_runs(logger):
        declared = _DECLARED.setdefault(run.id, set())
        todo = [(s, "used") for s in used] + [(s, "made") for s in made]
        todo = [(s, k) for s, k in todo if (s.name, k) not in declared]
        with tempfile.TemporaryDirectory(prefix="lightning_mia-artifact-") as tmp:
            for i, (spec, kind) in enumerate(todo):
                scratch = Path(tmp) / str(i)
                scratch.mkdir()
                artifact = _build_artifact(spec, scratch)
                if kind == "made":
                    run.log_artifact(artifact)
                elif run.offline:
                    run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
                else:
                    run.use_artifact(artifact)
                declared.add((spec.name, kind))
