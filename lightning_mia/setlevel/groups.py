"""User-level audits: one p-value per group of the suspect set (a user, an artist, a domain).

    rows = group_rows(plan, blind_plan, suspect_x, reference_x, suspect_b, reference_b,
                      labels, alpha=0.01, shift_alpha=0.05, seed=0)

Each group G is tested against the reference set with an aggregation that never saw G:
- shadow-only aggregation: the one fitted on the shadows; G is tested against all of R;
- held-out aggregation: fitted on every *other* group's suspect samples (and the shadow rows,
  if any) against a fixed random part of R (leave one group out), so all of G is tested,
  against the rest of R.
Every group is tested against the same reference samples, so the tests are positively
dependent, under which Benjamini-Hochberg still controls the false discovery rate: a group is
`detected` when its BH-adjusted p-value (q) is below alpha and its own shift guard (the same
leave-one-group-out test on `blind/*` features) finds no shift at `shift_alpha`.
"""

from __future__ import annotations

import numpy as np

from lightning_mia.setlevel.procedure import MIN_FIT, MIN_TEST, Plan, fit_size
from lightning_mia.setlevel.result import NOT_DETECTED, GroupRow, decide
from lightning_mia.setlevel.scorer import fit_scorer
from lightning_mia.setlevel.stats import Outcome, benjamini_hochberg, one_sided_test


def _scores(
    plan: Plan,
    suspect: np.ndarray,
    reference: np.ndarray,
    in_group: np.ndarray,
    r_split: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray] | None:
    """(group scores, reference scores), or None when nothing is left to fit on."""
    if not plan.held_out:
        return plan.fixed.score(suspect[in_group]), plan.fixed.score(reference)
    rest = suspect[~in_group]
    if len(rest) < MIN_FIT:
        return None
    r_fit, r_test = r_split
    x = np.concatenate([plan.shadow_x, rest, reference[r_fit]])
    y = np.concatenate([plan.shadow_y, np.ones(len(rest)), np.zeros(len(r_fit))])
    scorer = fit_scorer(x, y, plan.names, plan.l2, plan.components)
    return scorer.score(suspect[in_group]), scorer.score(reference[r_test])


def _test(
    plan: Plan | None,
    suspect: np.ndarray,
    reference: np.ndarray,
    in_group: np.ndarray,
    r_split: tuple[np.ndarray, np.ndarray],
    seed: int,
) -> Outcome | None:
    if plan is None:
        return None
    scores = _scores(plan, suspect, reference, in_group, r_split)
    if scores is None:
        return None
    return one_sided_test(*scores, plan.test, plan.permutations, seed)


def reference_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fitted, tested) indices of the reference set, shared by every group's test."""
    order = np.random.default_rng(seed).permutation(n)
    k = fit_size(n, fraction)
    return order[:k], order[k:]


def group_rows(
    plan: Plan,
    blind_plan: Plan | None,
    suspect: np.ndarray,
    reference: np.ndarray,
    suspect_blind: np.ndarray,
    reference_blind: np.ndarray,
    labels: np.ndarray,
    alpha: float,
    shift_alpha: float,
    seed: int = 0,
) -> tuple[GroupRow, ...]:
    """One row per group (sorted by name): its test, BH q-value, shift p and decision."""
    names = sorted(set(labels.tolist()))
    r_split = reference_split(len(reference), plan.fit_fraction, seed)
    tested: list[tuple[str, int, Outcome | None, Outcome | None, str]] = []
    for j, name in enumerate(names):
        in_group = labels == name
        size = int(in_group.sum())
        if size < MIN_TEST:
            tested.append((name, size, None, None, f"{size} sample: too small to test"))
            continue
        outcome = _test(plan, suspect, reference, in_group, r_split, seed + j)
        note = "" if outcome else "no other group to fit the aggregation on"
        shift = _test(blind_plan, suspect_blind, reference_blind, in_group, r_split, seed + j)
        tested.append((name, size, outcome, shift, note))
    p = np.array([o.p_value for _, _, o, _, _ in tested if o is not None])
    q = iter(benjamini_hochberg(p).tolist())
    rows = []
    for name, size, outcome, shift, note in tested:
        if outcome is None:
            rows.append(GroupRow(name, size, None, None, None, NOT_DETECTED, note))
            continue
        q_value = next(q)
        shift_p = None if shift is None else shift.p_value
        shifted = shift_p is not None and shift_p < shift_alpha
        rows.append(
            GroupRow(name, size, outcome, q_value, shift_p, decide(q_value, alpha, shifted), note)
        )
    return tuple(rows)
