"""Attack reports (report.json, report.md, roc.png, a terminal table) and the W&B helpers.

The only module that imports `wandb` (lazily, inside functions). Every W&B helper takes a
Lightning logger and is a no-op for anything but a `WandbLogger`, so callers never branch.

report.json (keys sorted; `null` where unknown)::

    {
      "setting": "shadow" | "partial",      "known_fraction": null | 0.5,
      "family": "diffusion",                "num_images": 4,       # N images per caption
      "num_shadows": 2,                     "seeds": {"attack": 0, "query": 0, ...},
      "splits_hash": "ab12...",
      "target": {"run_name": "diffusion-target-000", "train_steps_per_image": 300.0,
                 "augmentation": {...}},
      "test_samples": {"members": 64, "non_members": 64},     # rows the metrics are read on
      "attacks": {
        "<name>": {
          "access": "black-box" | "gray-box" | "none",
          "queries_per_sample": 4 | null,    "seconds_per_sample": 0.8 | null,
          "features": ["pixel/mse_mean", ...],
          "details": {...},                  # attack-specific (threshold baseline: its rule)
          "metrics": {"accuracy" | "auc" | "tpr@1%fpr" | "tpr@0.1%fpr":
                      {"value": 0.93 | null, "low": 0.90, "high": 0.95, "resolvable": true}}
        }
      },
      "baselines": {"threshold": {...same shape...}, "blind": {...same shape...}},
      "created": "2026-01-01T12:00:00+00:00",
      "notes": ["...", ...]
    }

`value` is null and `resolvable` false for a TPR@FPR with fewer than 1/budget non-members;
`low`/`high` are the bootstrap 95% percentile interval.
"""

from __future__ import annotations

import datetime
import io
import json
import netrc
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_mia.metrics import METRIC_NAMES, Metric, roc_curve
from lightning_mia.paths import atomic_write_bytes

REPORT_JSON, REPORT_MD, ROC_PNG = "report.json", "report.md", "roc.png"
WANDB_HOST = "api.wandb.ai"
METRIC_LABELS = {
    "accuracy": "accuracy",
    "auc": "AUC",
    "tpr@1%fpr": "TPR@1%FPR",
    "tpr@0.1%fpr": "TPR@0.1%FPR",
}


@dataclass
class AttackResult:
    """One attack's (or baseline's) figures; `scores` etc. are kept for plots, not in JSON."""

    name: str
    access: str
    queries_per_sample: int | None
    metrics: dict[str, Metric]
    features: list[str]
    seconds_per_sample: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    scores: torch.Tensor | None = None  # (S,) test scores, higher = member
    labels: torch.Tensor | None = None  # (S,) bool
    sample_id: torch.Tensor | None = None  # (S,) int64

    def to_dict(self) -> dict[str, Any]:
        return {
            "access": self.access,
            "queries_per_sample": self.queries_per_sample,
            "seconds_per_sample": self.seconds_per_sample,
            "features": list(self.features),
            "details": dict(self.details),
            "metrics": {k: m.to_dict() for k, m in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> AttackResult:
        metrics = {k: Metric.from_dict(m) for k, m in d.get("metrics", {}).items()}
        return cls(
            name, d["access"], d.get("queries_per_sample"), metrics, list(d.get("features", [])),
            d.get("seconds_per_sample"), dict(d.get("details", {})),
        )  # fmt: skip


@dataclass
class AttackReport:
    """Everything one attack run established (see the module docstring for the JSON)."""

    setting: str
    family: str
    num_images: int | None
    num_shadows: int
    seeds: dict[str, Any]
    splits_hash: str
    target: dict[str, Any]
    attacks: dict[str, AttackResult]
    baselines: dict[str, AttackResult]
    known_fraction: float | None = None
    test_samples: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    created: str = field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat()
    )

    def results(self) -> Iterator[tuple[str, AttackResult]]:
        """("attack" | "baseline", result) for every attack, then every baseline."""
        yield from (("attack", r) for r in self.attacks.values())
        yield from (("baseline", r) for r in self.baselines.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "setting": self.setting,
            "known_fraction": self.known_fraction,
            "family": self.family,
            "num_images": self.num_images,
            "num_shadows": self.num_shadows,
            "seeds": dict(self.seeds),
            "splits_hash": self.splits_hash,
            "target": dict(self.target),
            "test_samples": dict(self.test_samples),
            "attacks": {n: r.to_dict() for n, r in self.attacks.items()},
            "baselines": {n: r.to_dict() for n, r in self.baselines.items()},
            "created": self.created,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AttackReport:
        parts = {
            k: {n: AttackResult.from_dict(n, r) for n, r in d[k].items()}
            for k in ("attacks", "baselines")
        }
        simple = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k not in parts}
        return cls(**simple, **parts)


def read_report(folder: str | os.PathLike) -> AttackReport:
    """The report.json of an attack folder (scores are not stored there)."""
    return AttackReport.from_dict(json.loads((Path(folder) / REPORT_JSON).read_text("utf-8")))


def _rows(report: AttackReport) -> list[list[str]]:
    rows = []
    for kind, r in report.results():
        q = "-" if r.queries_per_sample is None else str(r.queries_per_sample)
        cells = [r.metrics[m].format() if m in r.metrics else "-" for m in METRIC_NAMES]
        rows.append([r.name if kind == "attack" else f"{r.name} (baseline)", r.access, q, *cells])
    return rows


_HEADER = ["attack", "access", "queries", *(METRIC_LABELS[m] for m in METRIC_NAMES)]


def format_table(report: AttackReport) -> str:
    """The attack x metric table as aligned plain text, for the terminal."""
    rows = [_HEADER, *_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = f"{report.setting} setting, {report.family}, {report.num_shadows} shadow model(s)"
    return "\n".join([title, *lines])


def render_markdown(report: AttackReport) -> str:
    """report.md: the run's facts, the attack x metric table ("n/r" = not resolvable), notes."""
    t = report.target
    facts = [
        f"- setting: `{report.setting}`"
        + (f" (known fraction {report.known_fraction})" if report.known_fraction else ""),
        f"- family: `{report.family}`; target: `{t.get('run_name', '?')}`, "
        f"{t.get('train_steps_per_image', '?')} training steps per image, "
        f"augmentation {json.dumps(t.get('augmentation', {}), sort_keys=True)}",
        f"- images per query caption: {report.num_images}; shadow models: {report.num_shadows}",
        f"- test samples: {report.test_samples}; seeds: {json.dumps(report.seeds, sort_keys=True)}",
        f"- splits hash: `{report.splits_hash}`; created {report.created}",
    ]
    table = ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    table += ["| " + " | ".join(row) + " |" for row in _rows(report)]
    notes = [f"- {n}" for n in report.notes]
    parts = ["# Membership inference report", "", *facts, "", *table, "", "![ROC](roc.png)"]
    if notes:
        parts += ["", "## Notes", "", *notes]
    return "\n".join(parts) + "\n"


def render_roc_png(report: AttackReport) -> bytes:
    """ROC curves of every result with scores, log-log axes, chance line; PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    negatives = [int((~r.labels).sum()) for _, r in report.results() if r.labels is not None]
    floor = 0.5 / max(max(negatives, default=1000), 1)
    for kind, r in report.results():
        if r.scores is None or r.labels is None:
            continue
        fpr, tpr, _ = roc_curve(r.scores, r.labels)
        auc = r.metrics.get("auc")
        label = f"{r.name}{' (baseline)' if kind == 'baseline' else ''}"
        if auc is not None and auc.value is not None:
            label += f" AUC {auc.value:.3f}"
        ax.plot(fpr.clamp(min=floor), tpr.clamp(min=floor), "-" if kind == "attack" else "--",
                label=label, linewidth=1.4)  # fmt: skip
    ax.plot([floor, 1], [floor, 1], ":", color="gray", label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1.05)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(f"{report.family}: {report.setting} setting")
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_report(folder: str | os.PathLike, report: AttackReport) -> Path:
    """Write report.json, report.md and roc.png into `folder`; returns the roc.png path.

    All three are rendered before anything is written, and each is written atomically, so a
    failure leaves no partial report (and an older complete one untouched).
    """
    folder = Path(folder)
    files = {
        REPORT_JSON: (json.dumps(report.to_dict(), indent=2, sort_keys=True) + "\n").encode(),
        REPORT_MD: render_markdown(report).encode(),
        ROC_PNG: render_roc_png(report),
    }
    for name, data in files.items():
        atomic_write_bytes(folder / name, data)
    return folder / ROC_PNG


# ---------------------------------------------------------------- W&B (no-ops without W&B)


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
