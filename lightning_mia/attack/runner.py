"""Train and evaluate attacks on query tables, with both baselines, into one AttackReport.

    report = run_attacks(ExperimentLayout("runs/demo"), target, shadows, ["pixel", "combined"])
    write_report(layout.attack, report)  # lightning_mia.attack.render

The rows of each setting (`shadow`, `partial`) and the checks of the tables are in
`attack.plan`. Nothing is chosen on test labels: learned attacks classify at probability 0.5,
the threshold baseline at the cut chosen on the training rows. Attack checkpoints go to
`<experiment>/attack/<name>/<setting>.ckpt`.

Beside the attacks, in every report: the `threshold` baseline; the `blind` diagnostic,
cross-validated on the target's own rows (`attack.blind`); in the shadow setting, LiRA of every
attack (`attack.lira`) from `calibration` tables (each shadow queried on the target's samples)
or from shadows that hold target samples. An attack whose AUC interval lies wholly below 0.5 is
flagged (`report.BACKWARDS`).
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
from lightning_mia.attack.complexity import complexity_results
from lightning_mia.attack.data import Rows
from lightning_mia.attack.lira import lira_results
from lightning_mia.attack.module import AttackModule
from lightning_mia.attack.plan import SETTINGS, AttackPlan, validate
from lightning_mia.attack.reference import reference_results
from lightning_mia.attack.report import (
    AttackContext,
    AttackReport,
    AttackResult,
    Realised,
    flag_backwards,
)
from lightning_mia.attack.training import FitOptions, fit_on_rows, held_out
from lightning_mia.metrics import FPR_BUDGETS, is_resolvable
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.shards import QueryTable
from lightning_mia.specs.attacks import (
    ATTACKS,
    AttackError,
    AttackSpec,
    QueryCosts,
    baseline_attack,
)

__all__ = ["AttackError", "SETTINGS", "run_attacks"]

HELD = "held-out training rows"  # where a learned attack's deployed 1%-FPR cut is chosen


@dataclass(frozen=True)
class _Fitting:
    """What every learned attack of one report is fitted and scored with."""

    plan: AttackPlan
    folder: Any  # attack checkpoints: <folder>/<attack>/<setting>.ckpt
    setting: str
    fit: FitOptions
    costs: QueryCosts
    seed: int
    n_boot: int

    def one(
        self, spec: AttackSpec, trained: tuple[AttackModule, list[str]] | None = None
    ) -> tuple[AttackModule, list[str], AttackResult]:
        """Fit one AttackModule on the training rows, or take `trained` (one fitted on these
        same rows and features); (model, its features, its result: the row
        `spec.learned_row`, with the 1%-FPR cut chosen on the held-out training rows)."""
        plan, seed = self.plan, self.seed
        x, y, xt, yt, ids, names = plan.matrices(spec.groups)
        if trained is not None and trained[1] == names:
            model = trained[0]
        else:
            model = fit_on_rows(
                x,
                y,
                names,
                self.folder / spec.name,
                self.setting,
                seed,
                self.fit,
                plan.strata,
                prefix=f"attack/{spec.name}",
            )
        held, scores = held_out(y, seed, plan.strata), model.score(xt)
        shadow = (model.score(x[held]), y[held].bool())
        realised = Realised.chosen(shadow, (scores, yt.bool()), HELD)
        result = AttackResult.from_scores(
            spec,
            scores,
            yt.bool(),
            ids,
            names,
            0.0,
            self.costs,
            seed,
            self.n_boot,
            row=spec.learned_row,
            realised=realised,
        )
        return model, names, result

    def each(
        self, names: Sequence[str], cache: dict[str, tuple[AttackModule, list[str]]]
    ) -> tuple[dict[str, AttackResult], dict[str, tuple[AttackModule, list[str]]]]:
        """Each attack's result and (model, features): trained, or scored by the model `cache`
        holds for it (then put there); one line for each trained, one for all those scored."""
        results: dict[str, AttackResult] = {}
        models: dict[str, tuple[AttackModule, list[str]]] = {}
        scored, started = [], time.perf_counter()
        for name in names:
            start, spec = time.perf_counter(), ATTACKS[name]
            model, used, results[spec.learned_row] = self.one(spec, cache.get(name))
            if cache.get(name, (None,))[0] is model:
                scored.append(name)
            else:
                rank_zero_info(f"attack {name}: done in {time.perf_counter() - start:.1f} s")
            models[name] = cache[name] = (model, used)
        if scored:
            rank_zero_info(
                f"attacks {', '.join(scored)}: scored with the trained attacks in "
                f"{time.perf_counter() - started:.1f} s"
            )
        return results, models


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
    train, test = (best.scores(x, names), y.bool()), (best.scores(xt, names), yt.bool())
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
        statistic="baseline",
        realised=Realised.chosen(train, test, "training rows"),
    )


CAPTION_FEATURES = ("blind/txt_emb_", "blind/caption_")  # the caption's, not the image's


def _blind(
    target: QueryTable,
    folder: Any,
    setting: str,
    costs: QueryCosts,
    seed: int,
    n_boot: int,
    fit: FitOptions,
    caption_only: bool = False,
) -> AttackResult:
    """The blind baseline, cross-validated on the target's own rows (`attack.blind`); with
    `caption_only` on the caption's features alone (`blind-caption`: how far the captions by
    themselves tell members from non-members, a control for caption-conditioned attacks)."""
    spec = baseline_attack()
    rows = Rows.stack([target])
    names, _ = rows.check(spec.groups)
    if caption_only:
        names = [n for n in names if n.startswith(CAPTION_FEATURES)]
        spec = AttackSpec(f"{spec.name}-caption", spec.groups, spec.access)
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
        statistic="diagnostic",
    )


def _beside(results: dict[str, AttackResult], lira: dict[str, AttackResult]) -> dict:
    """Every attack's rows together: learned, the paper's statistic, complexity-calibrated,
    then its LiRA rows (`lira-offline-<attack>`, `lira-online-...`)."""
    out = {}
    for attack in dict.fromkeys(r.attack for r in [*results.values(), *lira.values()]):
        out.update({k: r for k, r in results.items() if r.attack == attack})
        out.update({k: r for k, r in lira.items() if r.attack == attack})
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
        "TPR@FPR is read at the ROC point with the largest FPR strictly below the budget; (k FP) "
        "= the non-members admitted there",
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
    trained: dict[str, tuple[AttackModule, list[str]]] | None = None,
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
        trained: a cache of fitted attacks ({name: (model, features)}) shared by calls whose
            training rows are the same: the shadow setting's caption controls score the target's
            control queries with the attacks of the main report, not with new ones. Filled with
            what this call fits; used only in the shadow setting (in the partial setting the
            training rows hold part of the target's own table, which the control changes).
    """
    plan, names, notes = validate(
        target, shadows, attacks, setting, known_fraction, seed, calibration
    )
    context = context or AttackContext.from_tables(target, list(shadows), seed)
    costs = context.costs
    fit = FitOptions(max_epochs, patience, logger, progress)
    cache = trained if trained is not None and setting == "shadow" else {}
    fitting = _Fitting(plan, experiment.attack, setting, fit, costs, seed, n_boot)
    results, models = fitting.each(names, cache)
    for rows, more in (  # the papers' own statistics; complexity-calibrated scores
        reference_results(plan, names, costs, seed, n_boot),
        complexity_results(plan, names, costs, seed, n_boot),
    ):
        results, notes = {**results, **rows}, [*notes, *more]
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
    if any(n.startswith(CAPTION_FEATURES) for n in target.features):
        baselines["blind-caption"] = _blind(
            target, experiment.attack, setting, costs, seed, n_boot, fit, caption_only=True
        )
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
