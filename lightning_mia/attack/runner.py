"""Train and evaluate attacks on query tables, with both baselines, into one AttackReport.

    report = run_attacks(ExperimentLayout("runs/demo"), target, shadows, ["pixel", "combined"])
    write_report(layout.attack, report)  # lightning_mia.attack.render

Settings (ATTACKS.md):
- `shadow`: fit on every shadow table's rows (a seeded, stratified held-out part of them for
  early stopping), test on the target table.
- `partial`: a seeded, stratified `known_fraction` of the target's rows is the attacker's
  training data (again with a held-out part); the disjoint rest is the test set.
Nothing is chosen on test labels: learned attacks classify at probability 0.5, the threshold
baseline at the cut chosen on the training rows. Attack checkpoints go to
`<experiment>/attack/<name>/<setting>.ckpt`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightning
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.attack.baselines import fit_threshold_baseline
from lightning_mia.attack.calibration import lira_scores, shadow_score_matrix
from lightning_mia.attack.catalog import ATTACKS, baseline_attack, lira_features
from lightning_mia.attack.clid import CLID_FEATURES, fit_clid_threshold
from lightning_mia.attack.data import AttackDataModule, Rows, stratified_split
from lightning_mia.attack.module import AttackModule, fit_attack
from lightning_mia.attack.report import AttackContext, AttackReport, AttackResult
from lightning_mia.attack.spec import AttackError, AttackSpec, QueryCosts
from lightning_mia.metrics import FPR_BUDGETS, evaluate, is_resolvable
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.shards import QueryTable

__all__ = ["AttackError", "SETTINGS", "run_attacks"]

SETTINGS = ("shadow", "partial")
CHECKED_METADATA = ("family", "splits_hash", "num_images")  # must agree target vs shadows
VAL_FRACTION = 0.2  # held-out part of the training rows, for early stopping


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
            self.train.matrix(names), self.train.labels, self.test.matrix(names),
            self.test.labels, self.test.sample_id, names,
        )  # fmt: skip


def _check_labels(y: torch.Tensor, what: str, minimum: int) -> list[str]:
    members, non = int(y.bool().sum()), int((~y.bool()).sum())
    if members < minimum or non < minimum:
        return [f"{what} has {members} members and {non} non-members; needs >= {minimum} of each"]
    return []


def _check_tables(target: QueryTable, shadows: Sequence[QueryTable]) -> list[str]:
    problems = []
    for i, shadow in enumerate(shadows):
        for key in CHECKED_METADATA:
            a, b = target.metadata.get(key), shadow.metadata.get(key)
            if key == "num_images" and (a is None or b is None):
                continue
            if (a or "") != (b or ""):
                name = shadow.metadata.get("run_name", f"shadow {i}")
                problems.append(f"{name} has {key}={b!r} but the target has {key}={a!r}")
    return problems


def _plan(
    setting: str, target: QueryTable, shadows: Sequence[QueryTable], known_fraction: float,
    seed: int,
) -> tuple[AttackPlan | None, list[str]]:  # fmt: skip
    """The train/test rows of the setting, and every problem that prevents them."""
    problems = _check_labels(target.is_member, "the target table", 1)
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
        problems += _check_labels(train.is_member, "the shadow tables together", 2)
        problems += _check_tables(target, shadows)
        return AttackPlan(train, test, train.source - 1), problems
    if setting != "partial":
        return None, [*problems, f"unknown setting {setting!r}; known: {list(SETTINGS)}"]
    if not 0.0 < known_fraction < 1.0:
        return None, [*problems, f"known_fraction must be in (0, 1), got {known_fraction}"]
    if problems:
        return None, problems
    rows = Rows.stack([target])
    test, known = stratified_split(target.is_member, known_fraction, seed)
    problems += _check_labels(target.is_member[known], "the known part of the target", 2)
    problems += _check_labels(target.is_member[test], "the unknown part of the target", 1)
    return AttackPlan(rows.take(known), rows.take(test), None), problems


def _resolve(attacks: Sequence[str], plan: AttackPlan | None) -> tuple[list[str], list[str]]:
    """(attack names, notes): `all` = every registered attack whose features are present."""
    names, notes = [], []
    blind = baseline_attack().name
    for name in attacks:
        if name == "all":
            usable = [n for n, s in ATTACKS.items() if plan and not _feature_problems(plan, s)]
            names += [n for n in usable if n != blind]
        elif name == blind:
            notes.append(f"`{blind}` is always trained and reported among the baselines")
        else:
            names.append(name)
    return list(dict.fromkeys(names)), notes


def _feature_problems(plan: AttackPlan, spec: AttackSpec) -> list[str]:
    problems = [*plan.train.check(spec.groups)[1], *plan.test.check(spec.groups)[1]]
    return list(dict.fromkeys(problems))


def _validate(
    target: QueryTable, shadows: Sequence[QueryTable], attacks: Sequence[str], setting: str,
    known_fraction: float, seed: int,
) -> tuple[AttackPlan, list[str], list[str]]:  # fmt: skip
    """(plan, attack names, notes), or one AttackError listing every problem found."""
    plan, problems = _plan(setting, target, shadows, known_fraction, seed)
    names, notes = _resolve(attacks, plan)
    problems += ATTACKS.check(names)
    if not names:
        problems.append(f"no attack to run (asked for {list(attacks)})")
    for name in [n for n in names if n in ATTACKS] + [baseline_attack().name]:
        spec = ATTACKS[name]
        missing = _feature_problems(plan, spec) if plan is not None else []
        if missing:
            problems.append(
                f"attack {name!r} ({list(spec.groups)}): " + "; ".join(missing)
                + f" -> {spec.how_to_compute}"
            )  # fmt: skip
    if problems:
        raise AttackError("cannot run the attacks:\n  - " + "\n  - ".join(problems))
    return plan, names, notes


def _train_one(
    spec: AttackSpec, plan: AttackPlan, folder: Any, setting: str, seed: int, fit: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Fit one AttackModule on the training rows; (test logits, labels, sample ids, names)."""
    x, y, xt, yt, ids, names = plan.matrices(spec.groups)
    keep, held = stratified_split(y, VAL_FRACTION, seed + 1, plan.strata)
    dm = AttackDataModule((x[keep], y[keep]), (x[held], y[held]), (xt, yt), seed=seed)
    lightning.seed_everything(seed, verbose=False)  # initial weights: same seed, same attack
    module = AttackModule(len(names), feature_names=names, metric_prefix=f"attack/{spec.name}")
    rank_zero_info(f"attack {spec.name}: {len(names)} features, {len(keep)} training rows")
    best = fit_attack(module, dm, folder / spec.name, seed=seed, filename=setting, **fit)
    return best.score(xt), yt.bool(), ids, names


def _result(
    spec: AttackSpec, scores: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
    names: list[str], threshold: float, costs: QueryCosts, seed: int, n_boot: int,
    measured: bool = True,
) -> AttackResult:  # fmt: skip
    """`measured=False` for results derived from another attack's features (the threshold
    baseline, LiRA): no seconds of their own are measured."""
    metrics = evaluate(scores, labels, threshold, n_boot=n_boot, seed=seed)
    return AttackResult(
        spec.name, spec.access, spec.queries(costs), metrics, names,
        spec.seconds(costs) if measured else None, scores=scores, labels=labels, sample_id=ids,
    )  # fmt: skip


def _threshold_baseline(
    plan: AttackPlan, attacks: Sequence[str], costs: QueryCosts, seed: int, n_boot: int
) -> AttackResult:
    """Best single feature (by training AUC) among the attacks' non-blind features."""
    blind = baseline_attack().name
    groups = [g for n in attacks for g in ATTACKS[n].groups if g != blind]
    x, y, xt, yt, ids, names = plan.matrices(list(dict.fromkeys(groups)))
    best = fit_threshold_baseline(x, y, names)[0]
    group = best.feature.split("/", 1)[0]
    owner = next(s for s in ATTACKS.values() if group in s.groups and s.name in attacks)
    spec = AttackSpec("threshold", owner.groups, owner.access)
    result = _result(spec, best.scores(xt, names), yt.bool(), ids, [best.feature],
                     best.threshold, costs, seed, n_boot, measured=False)  # fmt: skip
    result.details = best.to_dict()
    return result


def _clid_threshold(plan: AttackPlan, costs: QueryCosts, seed: int, n_boot: int) -> AttackResult:
    """CLiD_th (Zhai et al. 2024): loss and CLiD terms robust-scaled on the training rows, α
    and the threshold chosen there (`attack.clid`)."""
    x, y, xt, yt, ids, names = plan.matrices(ATTACKS["clid"].groups)
    choice = fit_clid_threshold(x, y, names)
    spec = AttackSpec("clid-th", ATTACKS["clid"].groups, "gray-box")
    result = _result(spec, choice.scores(xt, names), yt.bool(), ids, list(CLID_FEATURES),
                     choice.threshold, costs, seed, n_boot, measured=False)  # fmt: skip
    result.details = choice.to_dict()
    return result


def _lira_results(
    names: Sequence[str], target: QueryTable, shadows: Sequence[QueryTable], costs: QueryCosts,
    seed: int, n_boot: int,
) -> tuple[dict[str, AttackResult], list[str]]:  # fmt: skip
    """Online LiRA of each calibratable score, where shadows were queried on the target's
    samples (splits with `shadow_pool: auxiliary+queries`); a note where they were not."""
    todo = {n: f for n, f in lira_features(names).items() if f in target.features}
    if not todo or not shadows:
        return {}, []
    _, _, observed = shadow_score_matrix(target, shadows, next(iter(todo.values())))
    if not observed.any():
        note = "LiRA skipped: no shadow was queried on the target's samples (make the splits "
        return {}, [note + "with shadow_pool: auxiliary+queries to calibrate gray-box scores)"]
    results = {}
    for name, feature in todo.items():
        scores = lira_scores(target, shadows, feature, online=True).float()
        scores = torch.nan_to_num(scores, nan=-1e9)  # no IN statistics: least likely member
        spec = AttackSpec(f"lira-{name}", ATTACKS[name].groups, ATTACKS[name].access)
        results[spec.name] = _result(
            spec, scores, target.is_member, target.sample_id, [feature], 0.0, costs, seed,
            n_boot, measured=False,
        )  # fmt: skip
    return results, [f"lira-*: online LiRA over {len(shadows)} shadows, threshold LR = 1"]


def _notes(setting: str, labels: torch.Tensor, n_boot: int, seed: int) -> list[str]:
    notes = [
        "learned attacks classify at member probability 0.5; the threshold baseline at the cut "
        "chosen on the training rows; no test label chooses a threshold, epoch or parameter",
        f"intervals: 95% percentile bootstrap, {n_boot} stratified resamples (seed {seed})",
        "TPR@FPR is read at the ROC point with the largest FPR not above the budget",
    ]
    if setting == "partial":
        notes.append("partial setting: trained on a known part of the target, tested on the rest")
    for name, budget in FPR_BUDGETS.items():
        if not is_resolvable(labels, budget):
            notes.append(
                f"{name}: not resolvable with {int((~labels).sum())} non-members in the test rows "
                f"(needs >= {round(1 / budget)})"
            )
    return notes


def run_attacks(
    experiment: ExperimentLayout,
    target: QueryTable,
    shadows: Sequence[QueryTable],
    attacks: Sequence[str],
    setting: str = "shadow",
    known_fraction: float = 0.5,
    seed: int = 0,
    max_epochs: int = 200,
    logger: Logger | None = None,
    progress: bool = True,
    context: AttackContext | None = None,
    n_boot: int = 1000,
    patience: int = 10,
) -> AttackReport:
    """Train, evaluate and report `attacks` plus the threshold and blind baselines.

    Args:
        experiment: experiment folder; attack checkpoints go under its `attack/`.
        target: the target model's query table (row 0).
        shadows: the shadow models' query tables (rows 1..K); needed in the shadow setting.
        attacks: registered attack names (`lightning_mia.attack.catalog.ATTACKS`) or "all".
        setting: "shadow" or "partial".
        known_fraction: partial setting: share of the target's rows the attacker knows.
        seed: seed of the splits, the attack initialisation and the bootstrap.
        max_epochs: upper bound of attack training (early stopping usually ends it).
        logger: a Lightning logger for the training curves (None: no logging).
        progress: show progress bars.
        context: the report's facts and the query costs; None = what the target's query
            table records (`AttackContext.from_tables`).
        n_boot: bootstrap resamples per metric.
        patience: early-stopping patience in epochs.
    """
    plan, names, notes = _validate(target, shadows, attacks, setting, known_fraction, seed)
    context = context or AttackContext.from_tables(target, list(shadows), seed)
    costs = context.costs
    fit = {"max_epochs": max_epochs, "patience": patience, "logger": logger, "progress": progress}
    blind = baseline_attack().name
    results: dict[str, AttackResult] = {}
    for name in [*names, blind]:
        start = time.perf_counter()
        spec = ATTACKS[name]
        scores, labels, ids, used = _train_one(spec, plan, experiment.attack, setting, seed, fit)
        results[name] = _result(spec, scores, labels, ids, used, 0.0, costs, seed, n_boot)
        rank_zero_info(f"attack {name}: done in {time.perf_counter() - start:.1f} s")
    if "clid" in names:  # the reference's calibrated combination, beside the learned attack
        results["clid-th"] = _clid_threshold(plan, costs, seed, n_boot)
    if setting == "shadow":
        lira, lira_notes = _lira_results(names, target, shadows, costs, seed, n_boot)
        results.update(lira)
        notes = [*notes, *lira_notes]
    baselines = {"threshold": _threshold_baseline(plan, names, costs, seed, n_boot)}
    baselines[blind] = results.pop(blind)
    labels = baselines[blind].labels
    return AttackReport(
        setting=setting,
        known_fraction=known_fraction if setting == "partial" else None,
        family=context.family,
        num_images=costs.num_images,
        num_shadows=context.num_shadows,
        seeds=dict(context.seeds),
        splits_hash=context.splits_hash,
        target=context.target.to_dict(),
        attacks=results,
        baselines=baselines,
        test_samples={"members": int(labels.sum()), "non_members": int((~labels).sum())},
        notes=[*notes, *_notes(setting, labels, n_boot, seed)],
    )
