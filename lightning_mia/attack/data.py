"""Attack data: feature matrices from query tables, seeded stratified splits, a DataModule.

X, y, names = features_for([shadow_1, shadow_2], "combined")  # (S, F), (S,), F names
keep, held = stratified_split(y, fraction=0.2, seed=0)
dm = AttackDataModule((X[keep], y[keep]), (X[held], y[held]), test=(X_t, y_t))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, TensorDataset

from lightning_mia.attack import ATTACKS, AttackError
from lightning_mia.query.shards import QueryTable

XY = tuple[torch.Tensor, torch.Tensor]  # (S, F) float32, (S,) float32 in {0, 1}


def groups_of(attack_or_groups: str | Sequence[str]) -> tuple[str, ...]:
    """Feature groups of a registered attack name, or the given groups themselves."""
    if isinstance(attack_or_groups, str):
        if attack_or_groups not in ATTACKS:
            raise AttackError(f"unknown attack {attack_or_groups!r}; known: {sorted(ATTACKS)}")
        return ATTACKS[attack_or_groups].groups
    return tuple(attack_or_groups)


def feature_names(table: QueryTable, groups: Sequence[str]) -> list[str]:
    """Sorted names of `table`'s features in `groups` (prefix `<group>/`)."""
    prefixes = tuple(f"{g}/" for g in groups)
    return sorted(n for n in table.features if n.startswith(prefixes))


def _table_name(table: QueryTable, index: int) -> str:
    return table.metadata.get("run_name") or f"table {index}"


def check_features(
    tables: Sequence[QueryTable], groups: Sequence[str]
) -> tuple[list[str], list[str]]:
    """(feature names, problems): every table must hold the same non-empty, finite features."""
    names = sorted({n for t in tables for n in feature_names(t, groups)})
    problems = []
    if not names:
        return [], [f"no features of groups {list(groups)} in any shard"]
    for i, table in enumerate(tables):
        missing = [n for n in names if n not in table.features]
        if missing:
            problems.append(f"{_table_name(table, i)} lacks {missing}")
        bad = [n for n in names if n in table.features and not table.features[n].isfinite().all()]
        if bad:
            problems.append(f"{_table_name(table, i)} has NaN/inf values in {bad}")
    return names, problems


def features_for(
    tables: QueryTable | Sequence[QueryTable], attack_or_groups: str | Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Rows of all `tables` stacked: X (S, F) float32, y (S,) float32 membership, names (F,).

    Features are those of the attack's groups (or of the groups given), sorted by name.
    """
    tables = [tables] if isinstance(tables, QueryTable) else list(tables)
    groups = groups_of(attack_or_groups)
    names, problems = check_features(tables, groups)
    if problems:
        raise AttackError(f"features of groups {list(groups)}: " + "; ".join(problems))
    x = torch.cat([t.feature_matrix(names) for t in tables]).float()  # (S, F)
    y = torch.cat([t.is_member for t in tables]).float()  # (S,)
    return x, y, names


def table_index(tables: Sequence[QueryTable]) -> torch.Tensor:
    """(S,) index of the table each stacked row comes from (for splits stratified by model)."""
    return torch.cat([torch.full((len(t),), i, dtype=torch.long) for i, t in enumerate(tables)])


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
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        dataset = TensorDataset(part[0].float(), part[1].float())
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=generator)

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
