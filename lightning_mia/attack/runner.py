"""Train and evaluate attacks on query tables, with both baselines, into one AttackReport.

    report = run_attacks(ExperimentLayout("runs/demo"), target, shadows, ["pixel", "combined"])
    write_report(layout.attack, report)  # lightning_mia.reporting

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.attack import ATTACKS, BASELINE_ATTACK, AttackError, AttackSpec
from lightning_mia.attack.baselines import fit_threshold_baseline
from lightning_mia.attack.calibration import lira_scores, shadow_score_matrix
from lightning_mia.attack.data import (
    AttackDataModule,
    check_features,
    features_for,
    stratified_split,
    table_index,
)
from lightning_mia.attack.module import AttackModule, fit_attack
from lightning_mia.metrics import FPR_BUDGETS, evaluate, is_resolvable
from lightning_mia.paths import ExperimentLayout
from lightning_mia.query.shards import QueryTable
from lightning_mia.reporting import AttackReport, AttackResult

__all__ = ["AttackError", "SETTINGS", "run_attacks"]

SETTINGS = ("shadow", "partial")
CHECKED_METADATA = ("family", "splits_hash", "num_images")  # must agree target vs shadows
VAL_FRACTION = 0.2  # held-out part of the training rows, for early stopping


@dataclass
class _Rows:
    """Which table rows train and which test, for one setting (features picked per attack)."""

    train_tables: list[QueryTable]
    train_rows: torch.Tensor | None  # indices into the stacked train tables (None = all)
    test_rows: torch.Tensor | None  # indices into the target table (None = all)
    strata: torch.Tensor | None  # (S_train,) source table of each training row

    def matrices(self, target: QueryTable, groups: Sequence[str]) -> tuple[Any, ...]:
        """(X_train, y_train, X_test, y_test, test sample ids, names) for feature `groups`."""
        x, y, names = features_for(self.train_tables, groups)
        xt, yt, ids = (
            target.feature_matrix(names).float(),
            target.is_member.float(),
            target.sample_id,
        )
        if self.train_rows is not None:
            x, y = x[self.train_rows], y[self.train_rows]
        if self.test_rows is not None:
            xt, yt, ids = xt[self.test_rows], yt[self.test_rows], ids[self.test_rows]
        return x, y, xt, yt, ids, names


def _resolve(attacks: Sequence[str], tables: Sequence[QueryTable]) -> tuple[list[str], list[str]]:
    """(attack names, notes): `all` = every registered attack whose features are present."""
    names, notes = [], []
    for name in attacks:
        if name == "all":
            found = [n for n, s in ATTACKS.items() if not check_features(tables, s.groups)[1]]
            names += [n for n in found if n != BASELINE_ATTACK]
        elif name == BASELINE_ATTACK:
            notes.append("`blind` is always trained and reported among the baselines")
        else:
            names.append(name)
    return list(dict.fromkeys(names)), notes


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


def _check_labels(y: torch.Tensor, what: str, minimum: int) -> list[str]:
    members, non = int(y.bool().sum()), int((~y.bool()).sum())
    if members < minimum or non < minimum:
        return [f"{what} has {members} members and {non} non-members; needs >= {minimum} of each"]
    return []


def _plan(
    setting: str,
    target: QueryTable,
    shadows: Sequence[QueryTable],
    known_fraction: float,
    seed: int,
) -> tuple[_Rows | None, list[str]]:
    """The train/test rows of the setting, and any problem that prevents them."""
    problems = _check_labels(target.is_member, "the target table", 1)
    if setting == "shadow":
        if not shadows:
            return None, [
                *problems,
                "no shadow tables: train shadow models (`python train.py fit ... "
                "--data.model_index K`, K >= 1) and query them, or use setting='partial'",
            ]
        pooled = torch.cat([s.is_member for s in shadows])
        problems += _check_labels(pooled, "the shadow tables together", 2)
        return _Rows(list(shadows), None, None, table_index(shadows)), problems
    if setting != "partial":
        return None, [*problems, f"unknown setting {setting!r}; known: {list(SETTINGS)}"]
    if not 0.0 < known_fraction < 1.0:
        return None, [*problems, f"known_fraction must be in (0, 1), got {known_fraction}"]
    if problems:
        return None, problems
    test, known = stratified_split(target.is_member, known_fraction, seed)
    problems += _check_labels(target.is_member[known], "the known part of the target", 2)
    problems += _check_labels(target.is_member[test], "the unknown part of the target", 1)
    return _Rows([target], known, test, None), problems


def _validate(
    target: QueryTable,
    shadows: Sequence[QueryTable],
    attacks: Sequence[str],
    setting: str,
    known_fraction: float,
    seed: int,
) -> tuple[_Rows, list[str], list[str]]:
    """(rows, attack names, notes), or one AttackError listing every problem found."""
    tables = [target, *shadows] if setting == "shadow" else [target]
    rows, problems = _plan(setting, target, shadows, known_fraction, seed)
    problems += _check_tables(target, shadows) if setting == "shadow" else []
    names, notes = _resolve(attacks, tables)
    unknown = [n for n in names if n not in ATTACKS]
    if unknown:
        problems.append(f"unknown attacks {unknown}; known: {sorted([*ATTACKS, 'all'])}")
    if not names and not unknown:
        problems.append(f"no attack to run (asked for {list(attacks)})")
    for name in [n for n in names if n in ATTACKS] + [BASELINE_ATTACK]:
        spec = ATTACKS[name]
        _, missing = check_features(tables, spec.groups)
        if missing:
            problems.append(f"attack {name!r} ({list(spec.groups)}): " + "; ".join(missing))
            problems[-1] += f" -> {spec.how_to_compute}" if spec.how_to_compute else ""
    if problems:
        raise AttackError("cannot run the attacks:\n  - " + "\n  - ".join(problems))
    return rows, names, notes


def _train_one(
    spec: AttackSpec,
    rows: _Rows,
    target: QueryTable,
    folder: Any,
    setting: str,
    seed: int,
    fit: Mapping[str, Any],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Fit one AttackModule on the training rows; (test logits, labels, sample ids, names)."""
    x, y, xt, yt, ids, names = rows.matrices(target, spec.groups)
    strata = rows.strata if rows.train_rows is None else None
    keep, held = stratified_split(y, VAL_FRACTION, seed + 1, strata)
    dm = AttackDataModule((x[keep], y[keep]), (x[held], y[held]), (xt, yt), seed=seed)
    lightning.seed_everything(seed, verbose=False)  # initial weights: same seed, same attack
    module = AttackModule(len(names), feature_names=names, metric_prefix=f"attack/{spec.name}")
    rank_zero_info(f"attack {spec.name}: {len(names)} features, {len(keep)} training rows")
    best = fit_attack(module, dm, folder / spec.name, seed=seed, filename=setting, **fit)
    return best.score(xt), yt.bool(), ids, names


def _queries(spec: AttackSpec, context: Mapping[str, Any]) -> int | None:
    override = context.get("queries_per_sample")
    if isinstance(override, Mapping) and spec.name in override:
        return int(override[spec.name])
    if isinstance(override, int) and spec.access == "black-box":
        return override
    return spec.queries(context)


def _seconds(name: str, context: Mapping[str, Any]) -> float | None:
    value = context.get("seconds_per_sample")
    if isinstance(value, Mapping):
        value = value.get(name)
    return None if value is None else float(value)


def _result(
    spec: AttackSpec, scores: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor,
    names: list[str], threshold: float, context: Mapping[str, Any], seed: int, n_boot: int,
) -> AttackResult:  # fmt: skip
    metrics = evaluate(scores, labels, threshold, n_boot=n_boot, seed=seed)
    return AttackResult(
        spec.name, spec.access, _queries(spec, context), metrics, names,
        _seconds(spec.name, context), scores=scores, labels=labels, sample_id=ids,
    )  # fmt: skip


def _threshold_baseline(
    rows: _Rows, target: QueryTable, attacks: Sequence[str], context: Mapping[str, Any],
    seed: int, n_boot: int,
) -> AttackResult:  # fmt: skip
    """Best single feature (by training AUC) among the attacks' non-blind features."""
    groups = [g for n in attacks for g in ATTACKS[n].groups if g != BASELINE_ATTACK]
    x, y, xt, yt, ids, names = rows.matrices(target, list(dict.fromkeys(groups)))
    best = fit_threshold_baseline(x, y, names)[0]
    group = best.feature.split("/", 1)[0]
    owner = next(s for s in ATTACKS.values() if group in s.groups and s.name in attacks)
    spec = AttackSpec("threshold", (group,), owner.access, owner.queries_per_sample)
    result = _result(spec, best.scores(xt, names), yt.bool(), ids, [best.feature],
                     best.threshold, context, seed, n_boot)  # fmt: skip
    result.queries_per_sample = _queries(owner, context)
    result.details = best.to_dict()
    return result


# The scalar score of each gray-box attack that LiRA calibrates (Carlini et al. 2022).
LIRA_FEATURES = {
    "loss": "loss/mean",
    "secmi": "secmi/t_error",
    "pia": "pia/mean",
    "clid": "clid/score",
    "nll": "nll/mean",
    "nll_gap": "nll_gap/mean",
}


def _lira_results(
    names: Sequence[str], target: QueryTable, shadows: Sequence[QueryTable],
    context: Mapping[str, Any], seed: int, n_boot: int,
) -> tuple[dict[str, AttackResult], list[str]]:  # fmt: skip
    """Online LiRA of each gray-box score, where shadows were queried on the target's samples
    (splits with `shadow_pool: auxiliary+queries`); a note where they were not."""
    todo = [n for n in names if n in LIRA_FEATURES and LIRA_FEATURES[n] in target.features]
    if not todo or not shadows:
        return {}, []
    _, _, observed = shadow_score_matrix(target, shadows, LIRA_FEATURES[todo[0]])
    if not observed.any():
        note = "LiRA skipped: no shadow was queried on the target's samples (make the splits "
        return {}, [note + "with shadow_pool: auxiliary+queries to calibrate gray-box scores)"]
    results = {}
    for name in todo:
        feature = LIRA_FEATURES[name]
        scores = lira_scores(target, shadows, feature, online=True).float()
        scores = torch.nan_to_num(scores, nan=-1e9)  # no IN statistics: least likely member
        spec = AttackSpec(f"lira-{name}", (name,), "gray-box", f"{name}_queries")
        results[spec.name] = _result(spec, scores, target.is_member, target.sample_id,
                                     [feature], 0.0, context, seed, n_boot)  # fmt: skip
    return results, [f"lira-*: online LiRA over {len(shadows)} shadows, threshold LR = 1"]


def _context_defaults(
    target: QueryTable, shadows: Sequence[QueryTable], context: Mapping[str, Any], seed: int
) -> dict[str, Any]:
    meta = target.metadata
    steps = meta.get("train_steps_per_image")
    target_info = {
        "run_name": meta.get("run_name", ""),
        "train_steps_per_image": float(steps) if steps else None,
        "augmentation": {},
        **dict(context.get("target", {})),
    }
    num_images = context.get("num_images", meta.get("num_images"))
    return {
        "family": context.get("family", meta.get("family", "")),
        "num_images": None if num_images is None else int(num_images),
        "num_shadows": int(context.get("num_shadows", len(shadows))),
        "seeds": {**dict(context.get("seeds", {})), "attack": seed},
        "splits_hash": context.get("splits_hash", meta.get("splits_hash", "")),
        "target": target_info,
    }


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
    context: Mapping[str, Any] | None = None,
    n_boot: int = 1000,
    patience: int = 10,
) -> AttackReport:
    """Train, evaluate and report `attacks` plus the threshold and blind baselines.

    Args:
        experiment: experiment folder; attack checkpoints go under its `attack/`.
        target: the target model's query table (row 0).
        shadows: the shadow models' query tables (rows 1..K); needed in the shadow setting.
        attacks: registered attack names (`lightning_mia.attack.ATTACKS`) or "all".
        setting: "shadow" or "partial".
        known_fraction: partial setting: share of the target's rows the attacker knows.
        seed: seed of the splits, the attack initialisation and the bootstrap.
        max_epochs: upper bound of attack training (early stopping usually ends it).
        logger: a Lightning logger for the training curves (None: no logging).
        progress: show progress bars.
        context: what the caller knows: family, num_images, num_shadows, seeds, splits_hash,
            target {run_name, train_steps_per_image, augmentation}, queries_per_sample (int or
            {attack: int}), seconds_per_sample (float or {attack: float}), `<name>_queries`.
        n_boot: bootstrap resamples per metric.
        patience: early-stopping patience in epochs.
    """
    context = dict(context or {})
    rows, names, notes = _validate(target, shadows, attacks, setting, known_fraction, seed)
    facts = _context_defaults(target, shadows, context, seed)
    context.setdefault("num_images", facts["num_images"])
    fit = {"max_epochs": max_epochs, "patience": patience, "logger": logger, "progress": progress}
    results: dict[str, AttackResult] = {}
    for name in [*names, BASELINE_ATTACK]:
        start = time.perf_counter()
        scores, labels, ids, used = _train_one(
            ATTACKS[name], rows, target, experiment.attack, setting, seed, fit
        )
        results[name] = _result(
            ATTACKS[name], scores, labels, ids, used, 0.0, context, seed, n_boot
        )
        rank_zero_info(f"attack {name}: done in {time.perf_counter() - start:.1f} s")
    if setting == "shadow":
        lira, lira_notes = _lira_results(names, target, shadows, context, seed, n_boot)
        results.update(lira)
        notes = [*notes, *lira_notes]
    blind = results.pop(BASELINE_ATTACK)
    baselines = {"threshold": _threshold_baseline(rows, target, names, context, seed, n_boot)}
    baselines[BASELINE_ATTACK] = blind
    return AttackReport(
        setting=setting,
        known_fraction=known_fraction if setting == "partial" else None,
        attacks=results,
        baselines=baselines,
        test_samples={
            "members": int(blind.labels.sum()),
            "non_members": int((~blind.labels).sum()),
        },
        notes=[*notes, *_notes(setting, blind.labels, n_boot, seed)],
        **facts,
    )
