"""A sampler that serves each index exactly once across distributed ranks (no padding).

PyTorch's `DistributedSampler` pads the last round with repeated samples so every rank gets the
same count; for queries that would generate (and count) some samples twice. `ShardedSampler`
gives rank r the indices r, r + W, r + 2W, ... in order. It subclasses `DistributedSampler`, so
Lightning leaves it in place instead of injecting its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch.distributed as dist
from torch.utils.data import DistributedSampler


def current_rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardedSampler(DistributedSampler):
    """Rank `rank` of `num_replicas` takes every `num_replicas`-th index from `rank`; unpadded."""

    def __init__(
        self, dataset: Sized, num_replicas: int | None = None, rank: int | None = None
    ) -> None:
        default_rank, default_world = current_rank_and_world()
        num_replicas = default_world if num_replicas is None else num_replicas
        rank = default_rank if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.total_size = len(dataset)
        self.num_samples = len(range(rank, self.total_size, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
