"""What an attack run trains on and is tested on, and every problem that prevents it.

    plan, names, notes = validate(target, shadows, ["all"], "shadow", 0.5, seed=0)

Settings (ATTACKS.md):
- `shadow`: fit on every shadow table's rows (a seeded, stratified held-out part of them for
  early stopping), test on the target table;
- `partial`: a seeded, stratified `known_fraction` of the target's rows is the attacker's
  training data (again with a held-out part); the disjoint rest is the test set.

Target, shadow and calibration tables must record the same family, splits and `QuerySpec`
(compared with `==`); `all` resolves to every registered attack whose features are present,
listed as reports list them (`specs.attacks.listing_order`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lightning_mia.attack.blind import BLIND_FOLDS
from lightning_mia.attack.data import Rows, stratified_split
from lightning_mia.attack.options import SETTINGS
from lightning_mia.query.shards import QueryTable, record_difference
from lightning_mia.specs.attacks import (
    ATTACKS,
    AttackError,
    AttackSpec,
    baseline_attack,
    listing_order,
)


@dataclass(frozen=True)
class AttackPlan:
    """The rows an attack trains on and is tested on in one setting, built once."""

    train: Rows
    test: Rows
    strata: torch.Tensor | None  # (S_train,) source model of each training row (shadow setting)

    def matrices(self, groups: Sequence[str]) -> tuple[Any, ...]:
        """(X_train, y_train, X_test, y_test, test sample ids, names) for feature `groups`."""
        names, _ = self.train.check(groups)
        return (
            self.train.matrix(names),
            self.train.labels,
            self.test.matrix(names),
            self.test.labels,
            self.test.sample_id,
            names,
        )


def check_labels(y: torch.Tensor, what: str, minimum: int) -> list[str]:
    members, non = int(y.bool().sum()), int((~y.bool()).sum())
    if members < minimum or non < minimum:
        return [f"{what} has {members} members and {non} non-members; needs >= {minimum} of each"]
    return []


def check_tables(target: QueryTable, others: Sequence[QueryTable], what: str) -> list[str]:
    """One line per table of `others` not queried as the target was: another family, splits
    or `QuerySpec` (compared with `==`)."""
    problems, mine = [], target.record
    for i, table in enumerate(others):
        theirs = table.record
        if (theirs.family, theirs.splits_hash, theirs.spec) != (
            mine.family,
            mine.splits_hash,
            mine.spec,
        ):
            diff = record_difference(mine, theirs, ("family", "splits_hash"))
            problems.append(
                f"{what} {theirs.run_name or i} was queried otherwise than the target ({diff}); "
                "query every model with the same settings"
            )
    return problems


def check_calibration(
    target: QueryTable, shadows: Sequence[QueryTable], calibration: Sequence[QueryTable]
) -> list[str]:
    """Calibration tables: one per shadow, in order, of the same model, holding every target
    sample (a query of the target's row, or the shadow's own table where it holds them)."""
    if not calibration:
        return []
    if len(calibration) != len(shadows):
        return [f"{len(calibration)} calibration tables for {len(shadows)} shadow tables"]
    problems = check_tables(target, calibration, "calibration query")
    targets = set(target.sample_id.tolist())
    for shadow, table in zip(shadows, calibration):
        name = shadow.record.run_name
        if table.record.run_name != name:
            problems.append(
                f"calibration table of {table.record.run_name!r} given for shadow {name!r}"
            )
        elif not targets <= set(table.sample_id.tolist()):
            lacking = len(targets - set(table.sample_id.tolist()))
            problems.append(f"calibration query of {name} lacks {lacking} of the target's samples")
    return problems


def plan_rows(
    setting: str,
    target: QueryTable,
    shadows: Sequence[QueryTable],
    known_fraction: float,
    seed: int,
) -> tuple[AttackPlan | None, list[str]]:
    """The train/test rows of the setting, and every problem that prevents them."""
    problems = check_labels(target.is_member, "the target table", 1)
    if setting == "shadow":
        if not shadows:
            return None, [
                *problems,
                "no shadow tables: train shadow models (`python train.py fit ... "
                "--data.model_index K`, K >= 1) and query them, or use setting='partial'",
            ]
        rows = Rows.stack([target, *shadows])  # source 0 = target, 1..K = shadows
        train, test = (
            rows.take(torch.nonzero(rows.source > 0)[:, 0]),
            rows.take(torch.nonzero(rows.source == 0)[:, 0]),
        )
        problems += check_labels(train.is_member, "the shadow tables together", 2)
        problems += check_tables(target, shadows, "shadow")
        return AttackPlan(train, test, train.source - 1), problems
    if setting != "partial":
        return None, [*problems, f"unknown setting {setting!r}; known: {list(SETTINGS)}"]
    if not 0.0 < known_fraction < 1.0:
        return None, [*problems, f"known_fraction must be in (0, 1), got {known_fraction}"]
    if problems:
        return None, problems
    rows = Rows.stack([target])
    test, known = stratified_split(target.is_member, known_fraction, seed)
    problems += check_labels(target.is_member[known], "the known part of the target", 2)
    problems += check_labels(target.is_member[test], "the unknown part of the target", 1)
    return AttackPlan(rows.take(known), rows.take(test), None), problems


def resolve_attacks(attacks: Sequence[str], plan: AttackPlan | None) -> tuple[list[str], list[str]]:
    """(attack names, notes): `all` = every registered attack whose features are present."""
    names, notes = [], []
    blind = baseline_attack().name
    for name in attacks:
        if name == "all":
            usable = [n for n, s in ATTACKS.items() if plan and not feature_problems(plan, s)]
            usable = listing_order(usable)
            names += [n for n in usable if n != blind]
        elif name == blind:
            notes.append(f"`{blind}` is always trained and reported among the baselines")
        else:
            names.append(name)
    return list(dict.fromkeys(names)), notes


def feature_problems(plan: AttackPlan, spec: AttackSpec) -> list[str]:
    problems = [*plan.train.check(spec.groups)[1], *plan.test.check(spec.groups)[1]]
    return list(dict.fromkeys(problems))


def validate(
    target: QueryTable,
    shadows: Sequence[QueryTable],
    attacks: Sequence[str],
    setting: str,
    known_fraction: float,
    seed: int,
    calibration: Sequence[QueryTable] = (),
) -> tuple[AttackPlan, list[str], list[str]]:
    """(plan, attack names, notes), or one AttackError listing every problem found."""
    plan, problems = plan_rows(setting, target, shadows, known_fraction, seed)
    problems += check_calibration(target, shadows, calibration)
    members = int(target.is_member.sum())
    if 0 < min(members, len(target) - members) < BLIND_FOLDS:  # (none: reported above)
        problems.append(
            f"the target table has {members} members and {len(target) - members} non-members; "
            f"the blind diagnostic's {BLIND_FOLDS}-fold cross-validation needs >= {BLIND_FOLDS} "
            "of each"
        )
    names, notes = resolve_attacks(attacks, plan)
    problems += ATTACKS.check(names)
    if not names:
        problems.append(f"no attack to run (asked for {list(attacks)})")
    for name in [n for n in names if n in ATTACKS] + [baseline_attack().name]:
        spec = ATTACKS[name]
        missing = feature_problems(plan, spec) if plan is not None else []
        if missing:
            problems.append(
                f"attack {name!r} ({list(spec.groups)}): "
                + "; ".join(missing)
                + f" -> {spec.how_to_compute}"
            )
    if len(problems) == 1:
        raise AttackError(f"cannot run the attacks: {problems[0]}")
    if problems:
        raise AttackError("cannot run the attacks:\n  - " + "\n  - ".join(problems))
    return plan, names, notes
