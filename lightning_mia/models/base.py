"""What every text-to-image family module shares: the run card, steps-per-image, sample grids,
and per-caption seeding.

Subclasses (`LatentDiffusionModule`, `Seq2SeqModule`) set `family`, call
`self.save_hyperparameters()` in `__init__`, and implement `per_sample_loss` and `generate`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_only

from lightning_mia.card import CARD_KEY, CheckpointError, RunCard


def caption_seeds(num_captions: int, seed: int | Sequence[int]) -> list[int]:
    """One seed per caption: a sequence is taken as is; an int `s` gives caption i `s + i`."""
    if isinstance(seed, int):
        return [seed + i for i in range(num_captions)]
    seeds = [int(s) for s in seed]
    if len(seeds) != num_captions:
        raise ValueError(f"got {len(seeds)} seeds for {num_captions} captions")
    return seeds


def per_caption_randn(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Gaussian noise (B, *shape), caption i's slice drawn only from its own generator.

    Drawn on the CPU (bit-identical on every machine and batch size), then moved to `device`.
    """
    out = [torch.randn(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(out).to(device)


def per_caption_rand(
    seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniform [0, 1) numbers (B, *shape), caption i's slice drawn from its own generator."""
    out = [torch.rand(*shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.stack(out).to(device)


def cached_by_id(
    cache: dict[int, torch.Tensor],
    ids: Sequence[int],
    compute: Callable[[list[int]], torch.Tensor],
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rows (B, ...) of a per-sample tensor, computed once per sample id and kept on the CPU.

    `compute(positions)` returns the rows of the batch positions whose ids are not cached yet.
    Used for what a frozen encoder makes of a training image (latents, VQ codes): each image is
    encoded in its first epoch only.
    """
    ids = [int(i) for i in ids]
    missing = [i for i, sid in enumerate(ids) if sid not in cache]
    if missing:
        new = compute(missing).detach().to("cpu", dtype)
        cache.update({ids[i]: row for i, row in zip(missing, new)})
    return torch.stack([cache[sid] for sid in ids])


class TextToImageModule(LightningModule, ABC):
    """Base of the text-to-image families: run card, training-length accounting, sample grids."""

    family: str = ""

    def __init__(self, sample_every_n_steps: int = 0, num_preview_images: int = 2) -> None:
        super().__init__()
        self.sample_every_n_steps = sample_every_n_steps
        self.num_preview_images = num_preview_images
        self.card: RunCard | None = None
        # Samples trained on, summed over ranks; saved with the weights so resume keeps counting.
        self.register_buffer("samples_seen", torch.zeros((), dtype=torch.float64))
        self._num_train_samples = 0
        self._preview_captions: list[str] = []

    # --- what subclasses provide -------------------------------------------------------------
    @abstractmethod
    def per_sample_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Training loss of each sample of `batch`, (B,)."""

    @abstractmethod
    def generate(
        self, captions: list[str], num_images: int = 4, seed: int | Sequence[int] = 0
    ) -> torch.Tensor:
        """Images for each caption, (B, N, 3, H, W) in [-1, 1]."""

    def card_references(self) -> dict[str, str]:
        """Folders the model depends on: {"autoencoder": ..., "tokenizer": ...}."""
        return {}

    def augmentation_config(self) -> dict[str, Any]:
        """Training augmentation in force (recorded in the card: it changes leakage)."""
        return {}

    # --- card --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "splits"):
            return
        if self.card is not None and self.card.splits_hash != dm.splits.hash:
            raise CheckpointError(
                f"checkpoint was trained on splits {self.card.splits_hash[:12]} but "
                f"{dm.layout.splits} has hash {dm.splits.hash[:12]}: they belong to different "
                "experiments"
            )
        if self.card is not None and self.card.model_index != dm.model_index:
            raise CheckpointError(
                f"checkpoint is model_index {self.card.model_index} but data.model_index is "
                f"{dm.model_index}"
            )
        self.card = RunCard(
            family=self.family,
            preset=str(self.hparams.get("preset", "")),
            model_index=dm.model_index,
            splits_hash=dm.splits.hash,
            experiment=str(dm.layout.root),
            augmentation=self.augmentation_config(),
            **self.card_references(),
        )
        self._num_train_samples = int(getattr(dm, "num_train_samples", 0))
        self._preview_captions = list(getattr(dm, "preview_captions", []))

    @property
    def train_steps_per_image(self) -> float:
        """How many times each training image has been seen (samples trained / set size)."""
        if self._num_train_samples <= 0:
            return 0.0
        return float(self.samples_seen.item()) / self._num_train_samples

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.card is not None:
            self.card.train_steps_per_image = self.train_steps_per_image
            checkpoint[CARD_KEY] = self.card.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if CARD_KEY not in checkpoint:
            raise CheckpointError("not a lightning_mia checkpoint (no run card)")
        card = RunCard.from_dict(checkpoint[CARD_KEY])
        if card.family != self.family:
            raise CheckpointError(f"checkpoint is of family {card.family!r}, not {self.family!r}")
        self.card = card

    # --- training loop pieces ------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        batch_size = len(batch["sample_id"])
        self.samples_seen += batch_size * self.trainer.world_size
        self.log("train/loss", loss, prog_bar=True, sync_dist=True, batch_size=batch_size)
        self.log("train/steps_per_image", self.train_steps_per_image, batch_size=batch_size)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step
        if self.sample_every_n_steps > 0 and step > 0 and step % self.sample_every_n_steps == 0:
            self.log_sample_grid()

    @rank_zero_only
    def log_sample_grid(self) -> None:
        """Generate for the fixed preview captions and log the grid (W&B only)."""
        if not self._preview_captions or self.logger is None:
            return
        from lightning_mia.reporting import log_image_grid

        was_training = self.training
        self.eval()
        with torch.no_grad():
            images = self.generate(self._preview_captions, self.num_preview_images, seed=0)
        self.train(was_training)
        log_image_grid(self.logger, "samples", images, self._preview_captions, self.global_step)
