"""One run of the set-level test: learn the aggregation without the tested samples, then test.

    plan = make_plan(names, shadow_x, shadow_y, options)       # what the aggregation learns from
    outcome, suspect_fitted, reference_fitted, scorer = run_test(plan, suspect_x, reference_x, rng)

The aggregation (`scorer.fit_scorer`) learns from one of
- `shadow`: the shadow models' rows, labelled member / non-member (the attacker trained them).
  Fitted once; every suspect and reference sample is then tested.
- `held-out`: a random `fit_fraction` of the suspect set and of the reference set, labelled
  suspect / reference, as CDI does; the rest of both sets is tested.
- `shadow+held-out`: both sets of rows together; the rest is tested.
None of them sees a tested sample, so under H0 (suspect set unused, both sets from one
distribution, independent samples) the tested scores of the two sets are exchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lightning_mia.setlevel.rows import SetLevelError
from lightning_mia.setlevel.scorer import Scorer, fit_scorer
from lightning_mia.setlevel.stats import Outcome, TestChoice, one_sided_test

Aggregation = Literal["auto", "shadow", "held-out", "shadow+held-out"]
AGGREGATIONS = ("auto", "shadow", "held-out", "shadow+held-out")
MIN_FIT = 2  # samples per set in the held-out part
MIN_TEST = 2  # samples per set tested


@dataclass(frozen=True)
class Plan:
    """How one run scores a suspect and a reference matrix (columns `names`)."""

    names: tuple[str, ...]
    held_out: bool  # fit on a part of the two sets
    shadow_x: np.ndarray  # (m, F) shadow rows (m = 0: none)
    shadow_y: np.ndarray  # (m,) 1 = member
    fixed: Scorer | None  # fitted once on the shadows (no held-out part)
    fit_fraction: float
    l2: float
    components: int
    test: TestChoice
    permutations: int

    @property
    def aggregation(self) -> str:
        if not self.held_out:
            return "shadow"
        return "shadow+held-out" if len(self.shadow_y) else "held-out"


def resolve_aggregation(requested: Aggregation, has_shadows: bool) -> str:
    """ "auto" -> "shadow" with shadow rows (no suspect sample is spent on fitting), else
    "held-out"; `SetLevelError` when shadow rows are asked for and missing."""
    if requested == "auto":
        return "shadow" if has_shadows else "held-out"
    if requested in ("shadow", "shadow+held-out") and not has_shadows:
        raise SetLevelError(f"aggregation {requested!r} needs shadow rows; none were given")
    return requested


def make_plan(
    names: Sequence[str],
    shadow_x: np.ndarray,
    shadow_y: np.ndarray,
    aggregation: str,
    fit_fraction: float = 0.5,
    l2: float = 1.0,
    components: int = 8,
    test: TestChoice = "auto",
    permutations: int = 9999,
) -> Plan:
    """A plan for `aggregation` ("shadow", "held-out", "shadow+held-out"), with the shadow-only
    aggregation fitted here once."""
    held_out = aggregation != "shadow"
    if aggregation == "held-out":
        shadow_x, shadow_y = np.zeros((0, len(names))), np.zeros(0)
    fixed = None if held_out else fit_scorer(shadow_x, shadow_y, names, l2, components)
    return Plan(
        tuple(names),
        held_out,
        shadow_x,
        shadow_y,
        fixed,
        fit_fraction,
        l2,
        components,
        test,
        permutations,
    )


def fit_size(n: int, fraction: float) -> int:
    """How many of n samples the held-out part takes: round(n * fraction), leaving at least
    MIN_TEST and taking at least MIN_FIT."""
    return int(min(max(round(n * fraction), MIN_FIT), n - MIN_TEST))


def held_out_problem(n: int, what: str, fraction: float) -> str | None:
    """Why `n` samples cannot be split into a fitted and a tested part, or None."""
    if n >= MIN_FIT + MIN_TEST:
        return None
    return (
        f"{what} too small for the held-out split: {n} samples, need at least "
        f"{MIN_FIT + MIN_TEST} ({MIN_FIT} to fit, {MIN_TEST} to test; fit_fraction {fraction}); "
        "bring more samples or shadow rows"
    )


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    k = fit_size(n, fraction)
    return order[:k], order[k:]


def score_sets(
    plan: Plan, suspect: np.ndarray, reference: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int, int, Scorer]:
    """(suspect scores, reference scores, suspect fitted, reference fitted, scorer): the scores
    of the tested samples of (n_s, F) and (n_r, F) under an aggregation fitted without them."""
    if not plan.held_out:
        return plan.fixed.score(suspect), plan.fixed.score(reference), 0, 0, plan.fixed
    s_fit, s_test = _split(len(suspect), plan.fit_fraction, rng)
    r_fit, r_test = _split(len(reference), plan.fit_fraction, rng)
    x = np.concatenate([plan.shadow_x, suspect[s_fit], reference[r_fit]])
    y = np.concatenate([plan.shadow_y, np.ones(len(s_fit)), np.zeros(len(r_fit))])
    scorer = fit_scorer(x, y, plan.names, plan.l2, plan.components)
    scores = scorer.score(suspect[s_test]), scorer.score(reference[r_test])
    return *scores, len(s_fit), len(r_fit), scorer


def run_test(
    plan: Plan, suspect: np.ndarray, reference: np.ndarray, rng: np.random.Generator
) -> tuple[Outcome, int, int, Scorer]:
    """(outcome, suspect fitted, reference fitted, scorer) of one run on (n_s, F), (n_r, F)."""
    s, r, s_fit, r_fit, scorer = score_sets(plan, suspect, reference, rng)
    seed = int(rng.integers(2**31))
    return one_sided_test(s, r, plan.test, plan.permutations, seed), s_fit, r_fit, scorer
