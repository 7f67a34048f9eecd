"""`ShardWriter`: a Lightning prediction writer that turns query batches into shards.

Each rank writes one shard per batch, named by its rank and first sample id, atomically; the
generated images (optional) are written as PNGs before the shard, so a shard on disk means its
images are complete. A killed run leaves only complete shards behind and is resumed by querying
the sample ids that no shard holds yet.

A few samples (`example_ids`) keep their pictures: the query image, the N generations and the
caption go to `examples-r<rank>-<first id>.safetensors` beside the batch's shard (written before
it), which `read_examples` merges; the attack report draws `examples.png` from them.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from lightning_mia.paths import atomic_write_bytes, atomic_write_json
from lightning_mia.query.shards import ShardError, write_shard
from lightning_mia.specs.query import QueryRecord

EXAMPLES_GLOB = "examples-r*.safetensors"


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (..., 3, H, W) -> uint8 (..., H, W, 3) on the CPU."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu()


def write_png(path: str | os.PathLike, image: torch.Tensor) -> None:
    """Write one uint8 (H, W, 3) image as a PNG, atomically."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image.numpy())).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_examples(
    path: str | os.PathLike,
    sample_id: torch.Tensor,
    query: torch.Tensor,
    generated: torch.Tensor,
    captions: list[str],
) -> None:
    """Write kept examples atomically: ids (E,), query (E, 3, H, W) and generated
    (E, N, 3, H', W') in [-1, 1] as uint8 images, captions in the metadata."""
    tensors = {
        "sample_id": sample_id.to(torch.int64).cpu().contiguous(),
        "query": to_uint8(query).contiguous(),  # (E, H, W, 3)
        "generated": to_uint8(generated).contiguous(),  # (E, N, H', W', 3)
    }
    atomic_write_bytes(path, save(tensors, metadata={"captions": json.dumps(list(captions))}))


def read_examples(folder: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """{sample_id: {"query": uint8 (H, W, 3), "generated": uint8 (N, H', W', 3), "caption"}}
    from a query folder's example files (empty when it kept none)."""
    out: dict[int, dict[str, Any]] = {}
    for path in sorted(Path(folder).glob(EXAMPLES_GLOB)):
        try:
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in ("sample_id", "query", "generated")}
                captions = json.loads((f.metadata() or {}).get("captions", "[]"))
        except (SafetensorError, OSError, ValueError) as err:
            raise ShardError(f"examples file {path}: unreadable ({err})") from err
        for i, sid in enumerate(tensors["sample_id"].tolist()):
            caption = captions[i] if i < len(captions) else ""
            out[sid] = {
                "query": tensors["query"][i],
                "generated": tensors["generated"][i],
                "caption": caption,
            }
    return out


class ShardWriter(BasePredictionWriter):
    """Write each prediction batch of `QueryModule` as a shard under `folder`, and the
    pictures of the samples in `example_ids` as example files."""

    def __init__(
        self, folder: str | os.PathLike, record: QueryRecord, example_ids: Any = ()
    ) -> None:
        super().__init__(write_interval="batch")
        self.folder = Path(folder)
        self.record = record
        self.example_ids = {int(i) for i in example_ids}
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
        tag = f"r{trainer.global_rank:03d}-{int(ids.min()):012d}"
        keep = [i for i, sid in enumerate(ids.tolist()) if sid in self.example_ids]
        if keep and "generated" in prediction:
            captions = [prediction["caption"][i] for i in keep]
            query, generated = prediction["query"][keep], prediction["generated"][keep]
            write_examples(
                self.folder / f"examples-{tag}.safetensors", ids[keep], query, generated, captions
            )
        name = f"shard-{tag}.safetensors"
        write_shard(
            self.folder / name,
            ids,
            prediction["is_member"],
            prediction["model_index"],
            prediction["features"],
            self.record,
        )
        if len(self.examples) < 8 and "query" in prediction:  # the first 2 of a batch, for W&B
            self.examples.append(
                {
                    "query": prediction["query"][:2].cpu(),
                    "generated": prediction["generated"][:2].cpu(),
                    "caption": list(prediction["caption"][:2]),
                    "is_member": prediction["is_member"][:2].cpu(),
                }
            )

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
