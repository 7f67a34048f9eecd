"""Weights & Biases: the loggers of every stage and what they log. The only module that imports
`wandb` (lazily, inside functions).

Every helper takes a Lightning logger and is a no-op for anything but a `WandbLogger`, so
callers never branch. `make_logger` picks online or offline from the environment (offline when
no API key is configured, `WANDB_MODE=disabled` turns W&B off).
"""

from __future__ import annotations

import netrc
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_mia.attack.report import AttackReport
from lightning_mia.metrics import METRIC_NAMES, Metric

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


def log_report(logger: Any, report: AttackReport, roc_png: str | os.PathLike) -> None:
    """Log the result table, the ROC image, summary scalars and per-sample scores to W&B."""
    for lg in _wandb_loggers(logger):
        columns = ["kind", "attack", "access", "queries"]
        columns += [f"{m}{s}" for m in METRIC_NAMES for s in ("", "/low", "/high")]
        data, summary = [], {}
        for kind, r in report.results():
            row: list[Any] = [kind, r.name, r.access, r.queries_per_sample]
            for m in METRIC_NAMES:
                metric = r.metrics.get(m, Metric(None, resolvable=False))
                row += [metric.value, metric.low, metric.high]
                summary[f"{kind}/{r.name}/{m}"] = metric.value
            data.append(row)
        lg.log_table("attack/results", columns=columns, data=data)
        lg.log_image("attack/roc", [str(roc_png)], caption=[f"{report.setting} setting"])
        scored = [r for _, r in report.results() if r.scores is not None]
        if scored and all(r.scores.numel() == scored[0].scores.numel() for r in scored):
            ids, labels = scored[0].sample_id, scored[0].labels
            rows = [
                [int(ids[i]) if ids is not None else i, bool(labels[i])]
                + [float(r.scores[i]) for r in scored]
                for i in range(scored[0].scores.numel())
            ]
            cols = ["sample_id", "is_member", *(r.name for r in scored)]
            lg.log_table("attack/scores", columns=cols, data=rows)
        lg.experiment.summary.update({k: v for k, v in summary.items() if v is not None})


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
        [captions[b], bool(is_member[b]), wandb.Image(query_images[b]),
         wandb.Image(_row_of(generated[b]))]
        for b in range(queries.shape[0])
    ]  # fmt: skip
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


def make_logger(
    experiment_dir: str | os.PathLike,
    name: str,
    job_type: str,
    group: str,
    offline: bool | None = None,
    project: str = "lightning_mia",
) -> Any:
    """A `WandbLogger` writing under `<experiment_dir>/wandb/`, offline when no key is set.

    `offline=None` decides from the environment (`wandb_mode()`); WANDB_MODE=disabled always
    wins, so tests never create runs.
    """
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode()
    if mode != "disabled" and offline is not None:
        mode = "offline" if offline else "online"
    save_dir = Path(experiment_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        name=name, project=project, save_dir=str(save_dir), job_type=job_type, group=group,
        mode=mode,
    )  # fmt: skip
