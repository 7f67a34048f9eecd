"""Attack data: query tables stacked once into `Rows`, seeded stratified splits, a DataModule.

rows = Rows.stack([shadow_1, shadow_2])          # every feature (S,), labels, sample ids
names, problems = rows.check(("pixel",))         # which features, and what is wrong
x, y = rows.matrix(names), rows.labels           # (S, F), (S,)
keep, held = stratified_split(y, fraction=0.2, seed=0, strata=rows.source)
fold = stratified_folds(y, folds=5, seed=0)     # (S,) fold of each row, for cross-validation
dm = AttackDataModule((x[keep], y[keep]), (x[held], y[held]), test=(x_t, y_t))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from lightning_mia.query.shards import QueryTable
from lightning_mia.specs.attacks import AttackError

XY = tuple[torch.Tensor, torch.Tensor]  # (S, F) float32, (S,) float32 in {0, 1}


@dataclass(frozen=True)
class Rows:
    """The rows of one or more query tables, stacked once: what an attack trains or tests on."""

    features: dict[str, torch.Tensor]  # name -> (S,) float32; only features every table holds
    is_member: torch.Tensor  # (S,) bool
    sample_id: torch.Tensor  # (S,) int64
    source: torch.Tensor  # (S,) int64: index of the table each row comes from
    problems: dict[str, tuple[str, ...]]  # feature name -> what is wrong with it (any table)

    @classmethod
    def stack(cls, tables: Sequence[QueryTable]) -> Rows:
        """Stack `tables` in order; a feature some table lacks or holds NaN/inf is recorded."""
        names = sorted({n for t in tables for n in t.features})
        problems: dict[str, list[str]] = {}
        for i, table in enumerate(tables):
            label = table.record.run_name or f"table {i}"
            for name in names:
                if name not in table.features:
                    problems.setdefault(name, []).append(f"{label} lacks {name}")
                elif not table.features[name].isfinite().all():
                    problems.setdefault(name, []).append(f"{label} has NaN/inf values in {name}")
        complete = [n for n in names if not any("lacks" in p for p in problems.get(n, []))]
        cat = torch.cat
        return cls(
            features={n: cat([t.features[n] for t in tables]).float() for n in complete},
            is_member=cat([t.is_member for t in tables]).bool(),
            sample_id=cat([t.sample_id for t in tables]),
            source=cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(tables)]),
            problems={n: tuple(p) for n, p in problems.items()},
        )

    def __len__(self) -> int:
        return int(self.sample_id.numel())

    def take(self, index: torch.Tensor) -> Rows:
        """The rows at `index` (a (R,) long tensor), in that order."""
        return Rows(
            {n: v[index] for n, v in self.features.items()},
            self.is_member[index],
            self.sample_id[index],
            self.source[index],
            self.problems,
        )

    @property
    def labels(self) -> torch.Tensor:
        """Membership as float32 (S,) in {0, 1}."""
        return self.is_member.float()

    def check(self, groups: Sequence[str]) -> tuple[list[str], list[str]]:
        """(feature names of `groups`, sorted; problems): usable when problems is empty."""
        prefixes = tuple(f"{g}/" for g in groups)
        names = sorted(n for n in {*self.features, *self.problems} if n.startswith(prefixes))
        if not names:
            return [], [f"no features of groups {list(groups)} in any shard"]
        return names, [p for n in names for p in self.problems.get(n, ())]

    def matrix(self, names: Sequence[str]) -> torch.Tensor:
        """The named features stacked into (S, F) float32."""
        return torch.stack([self.features[n] for n in names], dim=1)


def stratified_split(
    y: torch.Tensor, fraction: float, seed: int, strata: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of row indices into (kept, held-out) with `fraction` of each stratum held out.

    Strata are the label, crossed with `strata` (e.g. the source table) when given. A stratum
    of two or more rows contributes at least one row to each side.
    """
    if not 0.0 < fraction < 1.0:
        raise AttackError(f"split fraction must be in (0, 1), got {fraction}")
    key = y.long().reshape(-1) + 2 * (strata.long().reshape(-1) if strata is not None else 0)
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for value in torch.unique(key):
        idx = torch.nonzero(key == value).reshape(-1)
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_held = round(fraction * idx.numel())
        if idx.numel() >= 2:
            n_held = min(max(n_held, 1), idx.numel() - 1)
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(held)).values


def stratified_folds(y: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Seeded stratified k-fold assignment: the fold (S,) int64 of each row, in 0..folds-1.

    Each label's rows are shuffled and dealt to the folds in turn (the second label continuing
    where the first stopped), so every fold holds both labels in proportion, within one row.
    """
    if folds < 2:
        raise AttackError(f"cross-validation needs >= 2 folds, got {folds}")
    y = y.long().reshape(-1)
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty_like(y)
    offset = 0
    for value in torch.unique(y):
        idx = torch.nonzero(y == value).reshape(-1)
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        fold[idx] = (torch.arange(idx.numel()) + offset) % folds
        offset += idx.numel()
    return fold


class AttackDataModule(LightningDataModule):
    """Train / validation (early stopping) / test feature rows as in-memory tensors."""

    def __init__(
        self,
        train: XY,
        val: XY,
        test: XY | None = None,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        """
        Args:
            train: (X, y) rows the attack is fitted on.
            val: (X, y) held-out rows of the same (shadow or known) data, for early stopping.
            test: (X, y) rows to evaluate / predict (the target's), optional.
            batch_size: rows per optimisation step.
            seed: seed of the shuffling order.
        """
        super().__init__()
        for name, part in (("train", train), ("val", val), ("test", test)):
            if part is not None and part[0].shape[0] != part[1].shape[0]:
                raise AttackError(f"{name}: {part[0].shape[0]} rows of X, {part[1].shape[0]} of y")
        self.train, self.val, self.test = train, val, test
        self.batch_size = batch_size
        self.seed = seed

    def _loader(self, part: XY, shuffle: bool) -> DataLoader:
        """Whole batches indexed at once (the sampler hands the dataset a list of row indices),
        drawn exactly as `DataLoader(batch_size=..., shuffle=..., generator=...)` draws them
        (the loader takes its base seed from the same generator first): the same batches,
        without a Python call per row and a collate per batch."""
        dataset = TensorDataset(part[0].float(), part[1].float())
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        rows = (
            RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        )
        batches = BatchSampler(rows, batch_size=self.batch_size, drop_last=False)
        return DataLoader(dataset, sampler=batches, batch_size=None, generator=generator)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if self.test is None:
            raise AttackError("AttackDataModule has no test rows")
        return self._loader(self.test, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
