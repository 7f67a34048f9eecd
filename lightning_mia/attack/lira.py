"""LiRA beside every attack (Carlini et al. 2022): each attack's per-sample score, calibrated
against the shadows' scores of the same sample.

    results, notes = lira_results(names, target, shadows, calibration, models, costs, 0, 1000)
    results["lira-offline-pixel"], results["lira-online-loss"]

What is calibrated (`ScoreSource`): the attack's declared scalar (`AttackSpec.score_feature`,
e.g. `pixel/psnr_max`, `loss/mean`) on its declared scale (`AttackSpec.score_scale`: the log of
a loss, SecMI's t-error or PIA's distance), or, for an attack that declares none (`combined`),
the learned attack's own logit, which the classifier fitted on the shadows' rows gives for any
row (a logit: no transform). Its direction (larger = member) is read off the shadows' own rows,
never the target's labels. The Gaussians' centre is the median (`calibration.CENTRE`), as in
Carlini et al.'s script; `calibration`'s docstring lists where we follow it and where not.

Where the shadow scores come from: `calibration` tables (each shadow also queried on the target's
query samples, labelled with that shadow's own membership), or, without them, the shadows' own
tables where they hold target samples (`shadow_pool: auxiliary+queries`).

- `lira-offline-<attack>`: OUT shadows only, -log P(Z >= x) under the sample's OUT Gaussian; in
  the default splits every shadow is OUT for every target sample. Classifies "member" above
  the OUT median (score log 2); its deployed 1%-FPR threshold (`realised`) is the test's own,
  p < 1% (score -log 0.01): the realised FPR says whether the Gaussians hold on the target.
- `lira-online-<attack>`: where some shadows trained on the sample (IN), the log-likelihood
  ratio IN vs OUT; classifies "member" at ratio 1 (score 0).
- fewer than `FIXED_VARIANCE_BELOW` shadows: one global variance per side (pooled within
  samples, `calibration`), else per-sample variances.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from lightning_mia.attack.calibration import (
    CENTRE,
    FIXED_VARIANCE_BELOW,
    calibrate,
    off_scale,
    score_matrix,
    to_scale,
)
from lightning_mia.attack.module import AttackModule
from lightning_mia.attack.report import AttackResult, Realised
from lightning_mia.metrics import roc_auc
from lightning_mia.query.shards import QueryTable
from lightning_mia.specs.attacks import ATTACKS, AttackSpec, QueryCosts

OFFLINE_THRESHOLD = math.log(2.0)  # -log P(Z >= x) = log 2: x at the OUT Gaussian's median
P_ONE_PERCENT = -math.log(0.01)  # -log P(Z >= x) = -log 0.01: the test's 1%-FPR cut
ONLINE_THRESHOLD = 0.0  # log-likelihood ratio 0: IN and OUT equally likely
NO_IN_STATISTICS = -1e9  # online score of a sample without IN statistics: least likely member
Models = Mapping[str, tuple[AttackModule, list[str]]]  # attack -> (fitted classifier, features)


@dataclass(frozen=True)
class ScoreSource:
    """The per-(model, sample) scalar LiRA calibrates for one attack."""

    feature: str = ""  # a raw feature, or "" = the learned attack's logit
    model: AttackModule | None = None  # the learned attack (when feature is "")
    names: tuple[str, ...] = ()  # its input features, in column order
    scale: str = "identity"  # the feature's scale (`AttackSpec.score_scale`)

    @property
    def description(self) -> str:
        return self.feature or "the learned attack's logit"

    def missing(self, table: QueryTable) -> list[str]:
        """Features this source needs that `table` lacks."""
        need = [self.feature] if self.feature else list(self.names)
        return [n for n in need if n not in table.features]

    def values(self, table: QueryTable) -> torch.Tensor:
        """(S,) float64 scores of every row of `table`, on the source's scale."""
        if self.feature:
            return to_scale(table.features[self.feature], self.scale)
        return self.model.score(table.feature_matrix(list(self.names))).double()


def source_for(spec: AttackSpec, models: Models, scale: str | None = None) -> ScoreSource:
    """The declared scalar of `spec` on its declared scale (or on `scale`), else its learned
    logit (None-model source if not trained)."""
    if spec.score_feature:
        return ScoreSource(spec.score_feature, scale=scale or spec.score_scale)
    model, names = models.get(spec.name, (None, []))
    return ScoreSource("", model, tuple(names))


def direction(source: ScoreSource, shadows: Sequence[QueryTable]) -> int:
    """+1 if larger values mean member on the shadows' own rows (AUC >= 0.5), else -1."""
    if not source.feature:
        return 1  # a logit of "member"
    values = torch.cat([source.values(t) for t in shadows])
    labels = torch.cat([t.is_member for t in shadows])
    return 1 if float(roc_auc(values, labels)) >= 0.5 else -1


def _counts(mask: torch.Tensor) -> dict[str, int]:
    per_sample = mask.sum(0)  # (S,)
    return {"min": int(per_sample.min()), "max": int(per_sample.max())}


def _calibrated(
    spec: AttackSpec,
    source: ScoreSource,
    target: QueryTable,
    shadows: Sequence[QueryTable],
    tables: Sequence[QueryTable],
    costs: QueryCosts,
    seed: int,
    n_boot: int,
    centre: str = CENTRE,
) -> tuple[dict[str, AttackResult], list[str]]:
    """lira-offline-<name> (and lira-online-<name> where IN scores exist) of one attack, and
    the names of those the shadows cannot give a variance for (skipped)."""
    sign = direction(source, shadows)
    scores, is_in, observed = score_matrix(
        target.sample_id, tables, [sign * source.values(t) for t in tables]
    )  # (M, S) each
    x = sign * source.values(target)  # (S,)
    clamped = sum(
        off_scale(t.features[source.feature], source.scale)
        for t in ([target, *tables] if source.feature else [])
    )
    fixed = len(tables) < FIXED_VARIANCE_BELOW
    common = {
        "calibrates": source.description,
        "scale": source.scale if source.feature else "logit (the classifier's)",
        "centre": centre,
        "off_scale": clamped,  # raw scores outside the scale's domain, clamped into it
        "direction": sign,
        "shadows": len(tables),
        "variance": "global (fixed)" if fixed else "per sample (global where < 4 on a side)",
        "in_shadows_per_sample": _counts(is_in & observed),
        "out_shadows_per_sample": _counts(~is_in & observed),
    }
    out, skipped = {}, []
    for mode, online, threshold in (
        ("offline", False, OFFLINE_THRESHOLD),
        ("online", True, ONLINE_THRESHOLD),
    ):
        side = is_in if online else ~is_in
        if not (side & observed).any():
            continue
        lira, g = calibrate(x, scores, is_in, observed, online, fixed, centre=centre)
        stds = [g.std_out, g.std_in] if online else [g.std_out]
        if not all(torch.isfinite(std).all() for std in stds):  # one score per sample and side
            skipped.append(f"lira-{mode}-{spec.name}")
            continue
        lira = torch.nan_to_num(lira, nan=NO_IN_STATISTICS)
        test = (lira, target.is_member.bool())
        name = f"lira-{mode}-{spec.name}"
        realised = None if online else Realised.at(P_ONE_PERCENT, test, "LiRA's OUT Gaussians")
        out[name] = AttackResult.from_scores(
            spec,
            lira,
            target.is_member,
            target.sample_id,
            [source.description],
            threshold,
            costs,
            seed,
            n_boot,
            measured=False,
            details={**common, "mode": mode},
            row=name,
            statistic="calibrated",
            realised=realised,
        )
    return out, skipped


def lira_results(
    names: Sequence[str],
    target: QueryTable,
    shadows: Sequence[QueryTable],
    calibration: Sequence[QueryTable],
    models: Models,
    costs: QueryCosts,
    seed: int,
    n_boot: int,
    scale: str | None = None,
    centre: str = CENTRE,
) -> tuple[dict[str, AttackResult], list[str]]:
    """Offline and (where possible) online LiRA of every attack in `names`; notes say what
    was calibrated and what was skipped. `scale` fits every declared score on that scale
    instead of its own (`identity`: the raw scores, as before the scales were declared);
    `centre` is each side's centre (`calibration.CENTRE`)."""
    if not shadows:
        return {}, []
    if len(shadows) < 2:
        return {}, ["LiRA skipped: one shadow model gives no variance to fit (needs >= 2)"]
    tables = list(calibration) or list(shadows)
    _, _, observed = score_matrix(target.sample_id, tables, [torch.zeros(len(t)) for t in tables])
    if not observed.any():
        return {}, [
            "LiRA skipped: no shadow was queried on the target's samples (attack.py does so "
            "unless --calibrate false; or make the splits with shadow_pool: auxiliary+queries)"
        ]
    results, skipped = {}, []
    for name in names:
        source = source_for(ATTACKS[name], models, scale)
        lacking = [m for t in [target, *tables] for m in source.missing(t)]
        if (not source.feature and source.model is None) or lacking:
            skipped.append(f"{name} ({', '.join(sorted(set(lacking))) or 'not trained'})")
            continue
        done, no_variance = _calibrated(
            ATTACKS[name], source, target, shadows, tables, costs, seed, n_boot, centre
        )
        results.update(done)
        skipped += [f"{n} (the shadows give no variance: too few shadows)" for n in no_variance]
    fixed = len(tables) < FIXED_VARIANCE_BELOW
    variance = (
        f"one global variance per side (fewer than {FIXED_VARIANCE_BELOW} shadows)"
        if fixed
        else "per-sample variances"
    )
    on_scale = f"the {scale} scale" if scale else "its declared scale: log for positive errors"
    notes = [
        f"lira-offline-*: offline LiRA over {len(tables)} shadows' OUT scores of each target "
        f"sample ({variance}, centred at the {centre}, each score on {on_scale}), "
        "member above the OUT median; lira-online-* (where shadows "
        "trained on target samples): likelihood ratio IN vs OUT, member at ratio 1"
    ]
    if skipped:
        notes.append("LiRA skipped for: " + "; ".join(skipped))
    return results, notes
