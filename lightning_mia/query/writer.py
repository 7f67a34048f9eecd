"""`ShardWriter`: a Lightning prediction writer that turns query batches into shards.

Each rank writes one shard per batch, named by its rank and first sample id, atomically; the
generated images (optional) are written as PNGs before the shard, so a shard on disk means its
images are complete. A killed run leaves only complete shards behind and is resumed by querying
the sample ids that no shard holds yet.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from lightning_mia.paths import atomic_write_bytes, atomic_write_json
from lightning_mia.query.shards import write_shard


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (..., 3, H, W) -> uint8 (..., H, W, 3) on the CPU."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu()


def write_png(path: str | os.PathLike, image: torch.Tensor) -> None:
    """Write one uint8 (H, W, 3) image as a PNG, atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.numpy())).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


class ShardWriter(BasePredictionWriter):
    """Write each prediction batch of `QueryModule` as a shard under `folder`."""

    def __init__(self, folder: str | os.PathLike, metadata: dict[str, str]) -> None:
        super().__init__(write_interval="batch")
        self.folder = Path(folder)
        self.metadata = dict(metadata)
        self.examples: list[dict[str, Any]] = []  # a few (query, generated) pairs for W&B

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: dict[str, Any],
        batch_indices: Any,
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        ids = prediction["sample_id"].cpu()
        if ids.numel() == 0:
            return
        images = prediction.get("images")  # uint8 (B, N, H, W, 3) or None
        if images is not None:
            for sid, per_caption in zip(ids.tolist(), images):
                for k, image in enumerate(per_caption):
                    write_png(self.folder / "images" / f"{sid:012d}_{k}.png", image)
        name = f"shard-r{trainer.global_rank:03d}-{int(ids.min()):012d}.safetensors"
        write_shard(
            self.folder / name,
            ids,
            prediction["is_member"],
            prediction["model_index"],
            prediction["features"],
            self.metadata,
        )
        if len(self.examples) < 8 and "query" in prediction:
            keep = ("query", "generated", "caption")
            self.examples.append({k: prediction[k] for k in keep})
            self.examples[-1]["is_member"] = prediction["is_member"][: len(prediction["query"])]

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Add this rank's measured seconds (per stage) and sample count to its timing file."""
        seconds = getattr(pl_module, "seconds", {})
        path = self.folder / f"timing-r{trainer.global_rank:03d}.json"
        total = {"seconds": {}, "samples": 0}
        if path.is_file():
            total = json.loads(path.read_text(encoding="utf-8"))
        for name, value in seconds.items():
            total["seconds"][name] = total["seconds"].get(name, 0.0) + value
        total["samples"] += getattr(pl_module, "num_queried", 0)
        atomic_write_json(path, total)
