"""`MembershipDataModule`: one model's training set and query set, from the experiment's splits.

    dm = MembershipDataModule("runs/demo", ShapesSource(), model_index=1)   # shadow 1
    dm.prepare_data(); dm.setup()          # Trainer does both: splits.json made once, then checked
    next(iter(dm.train_dataloader()))      # {"pixel_values", "caption", "sample_id"}
    next(iter(dm.predict_dataloader()))    # ... + "is_member", each query once across ranks

Distributed queries: `predict_dataloader()` uses `ShardedSampler`, a `DistributedSampler` subclass
(so Lightning keeps it) that gives rank r the queries r, r+W, ... with no padding; rank and world
size come from the attached trainer, else from torch.distributed, else (0, 1). No Trainer flag is
needed (`use_distributed_sampler` may stay True).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_mia.data.duplicates import DuplicatePolicy
from lightning_mia.data.samplers import ShardedSampler, current_rank_and_world
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.data.sources import DataError, ImageCaptionSource
from lightning_mia.data.splits import (
    ShadowPool,
    SplitConfig,
    Splits,
    check_config,
    ensure_splits,
    load_splits,
)
from lightning_mia.data.stage import StageData
from lightning_mia.paths import ExperimentLayout


class SampleDataset(Dataset):
    """Samples by id: dicts of pixel_values (3, R, R), caption, sample_id[, is_member]."""

    def __init__(
        self,
        source: ImageCaptionSource,
        sample_ids: Sequence[int],
        resolution: int | None = None,
        membership: dict[int, bool] | None = None,
    ) -> None:
        self.source, self.sample_ids = source, list(sample_ids)
        self.resolution, self.membership = resolution, membership

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sid = self.sample_ids[index]
        item = {
            "pixel_values": self.source.image(sid, self.resolution),  # (3, R, R)
            "caption": self.source.caption(sid),
            "sample_id": sid,
        }
        if self.membership is not None:
            item["is_member"] = self.membership[sid]
        return item


def collate_samples(items: list[dict[str, Any]]) -> dict[str, Any]:
    """List of samples -> the batch dict of the contract."""
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),  # (B, 3, R, R)
        "caption": [it["caption"] for it in items],
        "sample_id": torch.tensor([it["sample_id"] for it in items], dtype=torch.int64),  # (B,)
    }
    if items and "is_member" in items[0]:
        batch["is_member"] = torch.tensor([it["is_member"] for it in items], dtype=torch.bool)
    return batch


class MembershipDataModule(pl.LightningDataModule):
    """Training and query data of one model (row `model_index` of splits.json)."""

    def __init__(
        self,
        experiment: str = "runs/demo",
        source: ImageCaptionSource = ShapesSource(),
        model_index: int = 0,
        train_split: Literal["members", "auxiliary", "public"] = "members",
        num_shadows: int = 2,
        target_size: int | None = None,
        aux_size: int | None = None,
        member_fraction: float = 0.5,
        seed: int = 0,
        shadow_pool: ShadowPool = "auxiliary",
        shadow_size: int | None = None,
        public_size: int | None = None,
        duplicates: DuplicatePolicy = "report",
        batch_size: int = 32,
        query_batch_size: int = 64,
        num_workers: int = 0,
        resolution: int | None = None,
        skip_bad_samples: bool = False,
        num_preview: int = 8,
    ) -> None:
        """
        Args:
            experiment: experiment folder (holds splits.json and every run).
            source: the image-caption dataset (class_path + init_args in YAML).
            model_index: row of the splits: 0 = target, 1..num_shadows = shadows.
            train_split: "members" = the row's members; "auxiliary" = the whole auxiliary pool;
                "public" = the public pool (needs public_size), disjoint from the target's and
                the shadows' pools: for the autoencoder, the attacker's encoder, a captioner.
            num_shadows: number of shadow rows.
            target_size: target pool size (members + non-members); None = half the data.
            aux_size: auxiliary pool size; None = same as target_size (or the other half).
            member_fraction: fraction of each pool that is members.
            seed: seed of the splits.
            shadow_pool: "auxiliary", or "auxiliary+queries" for shadows that also draw on the
                target pool (LiRA online).
            shadow_size: samples (members + non-members) each shadow draws from its pool;
                None = the whole pool. Lets a large auxiliary pool (for the autoencoder and
                the attacker's encoder) feed shadows sized like the target.
            public_size: size of the public pool (disjoint from the target and auxiliary pools);
                None = no public pool.
            duplicates: duplicate images found when the splits are made: "report" them (log and
                splits.json), or "drop" all but the lowest id of each before the draw.
            batch_size: training batch size (per device).
            query_batch_size: query (predict) batch size (per device).
            num_workers: DataLoader worker processes.
            resolution: image side; None = the source's resolution.
            skip_bad_samples: decode every image when making the splits; skip and record bad ones.
            num_preview: how many member captions `preview_captions` holds.
        """
        super().__init__()
        if train_split not in ("members", "auxiliary", "public"):
            raise DataError(
                f"train_split must be 'members', 'auxiliary' or 'public', got {train_split!r}"
            )
        if model_index < 0:
            raise ValueError(f"model_index must be >= 0, got {model_index}")
        self.experiment, self.source, self.model_index = experiment, source, model_index
        self.train_split = train_split
        self.split_config = asdict(
            SplitConfig(
                num_shadows=num_shadows,
                target_size=target_size,
                aux_size=aux_size,
                member_fraction=member_fraction,
                seed=seed,
                shadow_pool=shadow_pool,
                shadow_size=shadow_size,
                public_size=public_size,
                duplicates=duplicates,
            )
        )
        self.batch_size, self.query_batch_size = batch_size, query_batch_size
        self.num_workers, self.resolution, self.num_preview = num_workers, resolution, num_preview
        if skip_bad_samples:
            source.skip_bad_samples = True
        self.layout = ExperimentLayout(experiment)
        self.splits: Splits | None = None
        self.exclude_ids: set[int] = set()  # query ids already done (resumed query runs)
        self.query_row: int | None = None  # query another row's samples (None: model_index's)

    @classmethod
    def from_experiment(
        cls, experiment: str, model_index: int = 0, query_batch_size: int | None = None
    ) -> MembershipDataModule:
        """The DataModule of an existing experiment, rebuilt from what splits.json records
        (the source and the split config), so later stages need only the experiment folder."""
        from lightning_mia.data.sources import build_source

        layout = ExperimentLayout(experiment)
        if not layout.splits.is_file():
            raise DataError(f"{layout.splits}: no such file (is {experiment} an experiment?)")
        splits = load_splits(layout.splits)
        source = build_source(splits.dataset["source"])
        kwargs = dict(splits.config)  # the split arguments, as they were asked
        if query_batch_size is not None:
            kwargs["query_batch_size"] = query_batch_size
        return cls(experiment, source, model_index=model_index, **kwargs)

    # ---- splits ----
    def prepare_data(self) -> None:
        """Make splits.json once (Lightning calls this on one process per node), or validate it."""
        self.splits = ensure_splits(self.layout, self.source, **self.split_config)

    def setup(self, stage: str | None = None) -> None:
        """Load splits.json. Without a trainer this also makes/validates it (prepare_data)."""
        if self.splits is not None:
            return
        if self.trainer is None:
            self.prepare_data()
            return
        # the local rank 0 validated the data in prepare_data; the others check hash and config
        self.splits = load_splits(self.layout.splits)
        check_config(self.splits, self.layout.splits, **self.split_config)
        if self.source.skip_bad_samples:
            self.source.bad_samples.update(self.splits.skipped)
        self.splits.row(self.model_index)

    def _splits(self) -> Splits:
        if self.splits is None:
            raise RuntimeError("MembershipDataModule: call prepare_data() and setup() first")
        return self.splits

    # ---- what each stage reads ----
    @property
    def train_ids(self) -> list[int]:
        """The training set: the row's members, or a whole pool (auxiliary or public)."""
        splits = self._splits()
        if self.train_split == "members":
            return list(splits.row(self.model_index).members)
        return splits.pool(self.train_split)

    @property
    def num_train_samples(self) -> int:
        return len(self.train_ids)

    @property
    def preview_captions(self) -> list[str]:
        """A fixed few training-set captions (evenly spaced over sorted ids), for sample grids."""
        ids = self.train_ids
        k = min(self.num_preview, len(ids))
        return [self.source.caption(ids[i * len(ids) // k]) for i in range(k)]

    def stage_data(self) -> StageData:
        """What the module of this stage reads of its data (after setup)."""
        splits = self._splits()
        ids = self.train_ids
        return StageData(
            layout=self.layout,
            model_index=self.model_index,
            splits_hash=splits.hash,
            train_split=self.train_split,
            resolution=int(self.resolution or self.source.resolution),
            num_train_samples=len(ids),
            preview_captions=tuple(self.preview_captions),
            training_captions=lambda: [self.source.caption(i) for i in ids],
        )

    def train_dataset(self) -> SampleDataset:
        return SampleDataset(self.source, self.train_ids, self.resolution)

    def query_dataset(self, row: int | None = None) -> SampleDataset:
        """The queries of `row` (default: `query_row`, else model_index) by sample id, minus
        `exclude_ids`, with is_member = membership in *this* model's row (another row's queries:
        e.g. a shadow queried on the target's samples, for LiRA). Usable after setup."""
        splits = self._splits()
        row = self.query_row if row is None else row
        split = splits.row(self.model_index if row is None else row)
        own = set(splits.row(self.model_index).members)
        ids = [i for i in split.queries if i not in self.exclude_ids]
        labels = {i: i in own for i in split.queries}
        return SampleDataset(self.source, ids, self.resolution, labels)

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return current_rank_and_world()

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; the last partial batch is dropped only if one remains full.

        Each epoch's order is a function of (seed, epoch) alone — a `DistributedSampler` (so
        Lightning keeps it and calls `set_epoch`) of this trainer's ranks — and no loader draw
        touches the global random state, which a checkpoint saves: a run killed on an epoch
        boundary and resumed sees exactly the batches one uninterrupted run sees.
        """
        dataset = self.train_dataset()
        rank, world = self._rank_and_world()
        per_rank = math.ceil(len(dataset) / world)
        seed = int(self.split_config["seed"])
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, seed=seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            generator=torch.Generator().manual_seed(seed),  # worker seeds, not the global RNG
            drop_last=per_rank > self.batch_size,
            collate_fn=collate_samples,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def predict_dataloader(self) -> DataLoader:
        """The row's queries in sample-id order, each served once across ranks (no padding)."""
        dataset = self.query_dataset()
        rank, world = self._rank_and_world()
        sampler = ShardedSampler(dataset, num_replicas=world, rank=rank)
        if len(sampler) == 0 and self.trainer is not None and self.trainer.lightning_module:
            # fewer queries left than ranks (e.g. a resumed run): this rank has nothing to do
            self.trainer.lightning_module.allow_zero_length_dataloader_with_multiple_devices = True
        return DataLoader(
            dataset,
            batch_size=self.query_batch_size,
            sampler=sampler,
            collate_fn=collate_samples,
            num_workers=self.num_workers,
        )
