"""A callback for multi-process tests: each rank writes digests of its own weights.

    trainer: {callbacks: [{class_path: tests.ddp_probe.WeightDigestCallback,
                           init_args: {folder: /tmp/probe}}]}

`rank-<r>.json` holds, after every training batch, {global_step, digest of each top-level
submodule's parameters}: replicas that stayed in sync have equal digests at every step, and a
part that did not train keeps its digest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


def weight_digests(module: LightningModule) -> dict[str, str]:
    """{child name: sha256 of its parameters' bytes} for each top-level submodule."""
    out = {}
    for name, child in module.named_children():
        h = hashlib.sha256()
        for p in child.parameters():
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        out[name] = h.hexdigest()[:16]
    return out


class WeightDigestCallback(Callback):
    """After every training batch, record this rank's weight digests; write them at the end."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.steps: list[dict] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.steps.append({"global_step": trainer.global_step, **weight_digests(pl_module)})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self.steps.append({"global_step": trainer.global_step, **weight_digests(pl_module)})

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank-{trainer.global_rank}.json"
        path.write_text(json.dumps(self.steps, indent=1))
