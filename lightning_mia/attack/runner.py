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

Beside the attacks, in every report: the `threshold` baseline; the `blind` diagnostic,
cross-validated on the target's own rows (`attack.blind`); in the shadow setting, LiRA of every
attack (`attack.lira`) from `calibration` tables (each shadow queried on the target's samples)
or from shadows that hold target samples. An attack whose AUC interval lies wholly below 0.5 is
flagged (`report.BACKWARDS`). Target and shadow queries must agree on `CHECKED_METADATA`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.attack.baselines import fit_threshold_baseline
from lightning_mia.attack.blind import BLIND_FOLDS, blind_diagnostic
from lightning_mia.attack.clid import CLID_FEATURES, fit_clid_threshold
from lightning_mia.attack.data import Rows, stratified_split
from lightning_mia.attack.lira import lira_results
from lightning_mia.attack.module import AttackModule
from lightning_mia.attack.report import AttackContext, AttackReport, AttackResult, flag_backwards
from lightning_mia.attack.training import FitOptions, fit_on_rows
from lightning_mia.metrics import FPR_BUDGETS, is_resolvable
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.shards import QueryTable
from lightning_mia.specs.attacks import (
    ATTACKS,
    AttackError,
    AttackSpec,
    QueryCosts,
    baseline_attack,
    listing_order,
)

__all__ = ["AttackError", "SETTINGS", "run_attacks"]

SETTINGS = ("shadow", "partial")
# shard metadata target and shadow queries must agree on (QueryModule.shard_metadata)
CHECKED_METADATA = (
    "family",
    "splits_hash",
    "num_images",
    "seed",
    "captions",
    "captioner",
    "encoder",
    "signal_options",
)
CHECKED_WHEN_SET = ("num_images", "signal_options")  # compared where both tables record one


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


def _check_labels(y: torch.Tensor, what: str, minimum: int) -> list[str]:
    members, non = int(y.bool().sum()), int((~y.bool()).sum())
    if members < minimum or non < minimum:
        return [f"{what} has {members} members and {non} non-members; needs >= {minimum} of each"]
    return []


def _check_tables(target: QueryTable, others: Sequence[QueryTable], what: str) -> list[str]:
    """One line per table of `others` whose query settings differ from the target's."""
    problems = []
    for i, table in enumerate(others):
        diffs = []
        for key in CHECKED_METADATA:
            a, b = target.metadata.get(key) or "", table.metadata.get(key) or ""
            if a != b and not (key in CHECKED_WHEN_SET and "" in (a, b)):
                diffs.append(f"{key}={b!r} (target {key}={a!r})")
        if diffs:
            name = table.metadata.get("run_name") or f"{what} {i}"
            problems.append(
                f"{what} {name} was queried with other settings than the target: "
                + ", ".join(diffs)
                + "; query every model with the same settings"
            )
    return problems


def _check_calibration(
    target: QueryTable, shadows: Sequence[QueryTable], calibration: Sequence[QueryTable]
) -> list[str]:
    """Calibration tables: one per shadow, in order, of the same model, holding every target
    sample (a query of the target's row, or the shadow's own table where it holds them)."""
    if not calibration:
        return []
    if len(calibration) != len(shadows):
        return [f"{len(calibration)} calibration tables for {len(shadows)} shadow tables"]
    problems = _check_tables(target, calibration, "calibration query")
    targets = set(target.sample_id.tolist())
    for shadow, table in zip(shadows, calibration):
        name = shadow.metadata.get("run_name", "")
        if table.metadata.get("run_name", "") != name:
            problems.append(
                f"calibration table of {table.metadata.get('run_name')!r} given for shadow {name!r}"
            )
        elif not targets <= set(table.sample_id.tolist()):
            lacking = len(targets - set(table.sample_id.tolist()))
            problems.append(f"calibration query of {name} lacks {lacking} of the target's samples")
    return problems


def _plan(
    setting: str,
    target: QueryTable,
    shadows: Sequence[QueryTable],
    known_fraction: float,
    seed: int,
) -> tuple[AttackPlan | None, list[str]]:
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
        problems += _check_tables(target, shadows, "shadow")
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
            usable = listing_order(usable)
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
    target: QueryTable,
    shadows: Sequence[QueryTable],
    attacks: Sequence[str],
    setting: str,
    known_fraction: float,
    seed: int,
    calibration: Sequence[QueryTable] = (),
) -> tuple[AttackPlan, list[str], list[str]]:
    """(plan, attack names, notes), or one AttackError listing every problem found."""
    plan, problems = _plan(setting, target, shadows, known_fraction, seed)
    problems += _check_calibration(target, shadows, calibration)
    members = int(target.is_member.sum())
    if 0 < min(members, len(target) - members) < BLIND_FOLDS:  # (none: reported above)
        problems.append(
            f"the target table has {members} members and {len(target) - members} non-members; "
            f"the blind diagnostic's {BLIND_FOLDS}-fold cross-validation needs >= {BLIND_FOLDS} "
            "of each"
        )
    names, notes = _resolve(attacks, plan)
    problems += ATTACKS.check(names)
    if not names:
        problems.append(f"no attack to run (asked for {list(attacks)})")
    for name in [n for n in names if n in ATTACKS] + [baseline_attack().name]:
        spec = ATTACKS[name]
        missing = _feature_problems(plan, spec) if plan is not None else []
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


def _train_one(
    spec: AttackSpec, plan: AttackPlan, folder: Any, setting: str, seed: int, fit: FitOptions
) -> tuple[AttackModule, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Fit one AttackModule on the training rows; (model, test logits, labels, ids, names)."""
    x, y, xt, yt, ids, names = plan.matrices(spec.groups)
    model = fit_on_rows(
        x,
        y,
        names,
        folder / spec.name,
        setting,
        seed,
        fit,
        plan.strata,
        prefix=f"attack/{spec.name}",
    )
    return model, model.score(xt), yt.bool(), ids, names


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
    return AttackResult.from_scores(
        spec,
        best.scores(xt, names),
        yt.bool(),
        ids,
        [best.feature],
        best.threshold,
        costs,
        seed,
        n_boot,
        measured=False,
        details=best.to_dict(),
    )


def _clid_threshold(plan: AttackPlan, costs: QueryCosts, seed: int, n_boot: int) -> AttackResult:
    """CLiD_th (Zhai et al. 2024): loss and CLiD terms robust-scaled on the training rows, α
    and the threshold chosen there (`attack.clid`)."""
    x, y, xt, yt, ids, names = plan.matrices(ATTACKS["clid"].groups)
    choice = fit_clid_threshold(x, y, names)
    spec = AttackSpec("clid-th", ATTACKS["clid"].groups, "gray-box")
    return AttackResult.from_scores(
        spec,
        choice.scores(xt, names),
        yt.bool(),
        ids,
        list(CLID_FEATURES),
        choice.threshold,
        costs,
        seed,
        n_boot,
        measured=False,
        details=choice.to_dict(),
    )


def _blind(
    target: QueryTable,
    folder: Any,
    setting: str,
    costs: QueryCosts,
    seed: int,
    n_boot: int,
    fit: FitOptions,
) -> AttackResult:
    """The blind baseline, cross-validated on the target's own rows (`attack.blind`)."""
    spec = baseline_attack()
    rows = Rows.stack([target])
    names, _ = rows.check(spec.groups)
    cv = blind_diagnostic(rows, names, folder / spec.name, setting, seed, fit)
    return AttackResult.from_scores(
        spec,
        cv.scores,
        cv.labels,
        cv.sample_id,
        cv.features,
        0.0,
        costs,
        seed,
        n_boot,
        details=cv.details,
    )


def _beside(results: dict[str, AttackResult], lira: dict[str, AttackResult]) -> dict:
    """Every attack followed by what calibrates it (`lira-offline-<name>`, `lira-online-...`)."""
    out = {}
    for name, result in results.items():
        out[name] = result
        out.update(
            {k: lira[k] for k in (f"lira-{m}-{name}" for m in ("offline", "online")) if k in lira}
        )
    return out


def _notes(setting: str, labels: torch.Tensor, n_boot: int, seed: int) -> list[str]:
    notes = [
        "learned attacks classify at member probability 0.5; the threshold baseline at the cut "
        "chosen on the training rows; no test label chooses a threshold, epoch or parameter",
        f"blind (diagnostic): the blind baseline cross-validated ({BLIND_FOLDS} folds, seed "
        f"{seed}) on the target's own query rows, all of them in every setting; it diagnoses the "
        "benchmark (near 0.5: members and non-members alike; above: a distribution shift that "
        "inflates every attack) and is the one figure fitted on target labels, by design",
        f"intervals: 95% percentile bootstrap, {n_boot} stratified resamples (seed {seed})",
        "TPR@FPR is read at the ROC point with the largest FPR not above the budget; (k FP) = "
        "the non-members admitted there",
    ]
    members, non = int(labels.sum()), int((~labels).sum())
    if members != non:
        notes.append(f"accuracy is balanced accuracy: {members} members, {non} non-members")
    if setting == "partial":
        notes.append("partial setting: trained on a known part of the target, tested on the rest")
    for name, budget in FPR_BUDGETS.items():
        if not is_resolvable(labels, budget):
            notes.append(
                f"{name}: not resolvable with {non} non-members in the test rows "
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
    calibration: Sequence[QueryTable] = (),
) -> AttackReport:
    """Train, evaluate and report `attacks`, the threshold baseline, the blind diagnostic and
    (shadow setting) LiRA of every attack.

    Args:
        experiment: experiment folder; attack checkpoints go under its `attack/`.
        target: the target model's query table (row 0).
        shadows: the shadow models' query tables (rows 1..K); needed in the shadow setting.
        attacks: registered attack names (`lightning_mia.specs.attacks.ATTACKS`) or "all".
        setting: "shadow" or "partial".
        known_fraction: partial setting: share of the target's rows the attacker knows.
        seed: seed of the splits, the folds, the attack initialisation and the bootstrap.
        max_epochs: upper bound of attack training (early stopping usually ends it).
        logger: a Lightning logger for the training curves (None: no logging).
        progress: show progress bars.
        context: the report's facts and the query costs; None = what the target's query
            table records (`AttackContext.from_tables`).
        n_boot: bootstrap resamples per metric.
        patience: early-stopping patience in epochs.
        calibration: LiRA's shadow scores: each shadow's query on the target's samples (one
            table per shadow, in order, labelled with that shadow's membership); () = the
            shadows' own tables where they hold target samples.
    """
    plan, names, notes = _validate(
        target, shadows, attacks, setting, known_fraction, seed, calibration
    )
    context = context or AttackContext.from_tables(target, list(shadows), seed)
    costs = context.costs
    fit = FitOptions(max_epochs, patience, logger, progress)
    results: dict[str, AttackResult] = {}
    models: dict[str, tuple[AttackModule, list[str]]] = {}
    for name in names:
        start, spec = time.perf_counter(), ATTACKS[name]
        model, scores, labels, ids, used = _train_one(
            spec, plan, experiment.attack, setting, seed, fit
        )
        models[name] = (model, used)
        results[name] = AttackResult.from_scores(
            spec, scores, labels, ids, used, 0.0, costs, seed, n_boot
        )
        rank_zero_info(f"attack {name}: done in {time.perf_counter() - start:.1f} s")
    if "clid" in names:  # the reference's calibrated combination, beside the learned attack
        results["clid-th"] = _clid_threshold(plan, costs, seed, n_boot)
    if setting == "shadow":
        lira, lira_notes = lira_results(
            names, target, shadows, calibration, models, costs, seed, n_boot
        )
        results = _beside(results, lira)
        notes = [*notes, *lira_notes]
    baselines = {
        "threshold": _threshold_baseline(plan, names, costs, seed, n_boot),
        baseline_attack().name: _blind(
            target, experiment.attack, setting, costs, seed, n_boot, fit
        ),
    }
    notes += flag_backwards([*results.values(), *baselines.values()])
    labels = plan.test.is_member
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
