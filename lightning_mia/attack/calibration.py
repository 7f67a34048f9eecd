"""LiRA: per-sample shadow calibration of any scalar membership score (Carlini et al. 2022).

A raw score (pixel error, denoising loss, ...) mixes "is a member" with "is an easy sample".
Shadow models that did (IN) and did not (OUT) train on a sample show how its score is
distributed either way; LiRA fits one Gaussian per sample and side and asks how unusual the
target's score is:

    offline = -log P(Z >= x),      Z ~ N(centre_out, std_out)      (needs OUT shadows only)
    online  = log N(x; centre_in, std_in) - log N(x; centre_out, std_out)

Both are "higher = member" for a score whose larger values mean member (`direction` flips it).

What it follows, and where it differs (Carlini et al.'s script: tensorflow/privacy,
`research/mi_lira_2021/score.py` and `plot.py`):
- Scale: the script fits Gaussians to the logit of the true-class confidence, never to raw
  probabilities; here every calibrated score declares its scale (`AttackSpec.score_scale`,
  `to_scale`): the log of a positive error (loss, SecMI's t-error, PIA's distance), the logit
  of a probability, or the score itself where it is already on such a scale (PSNR, a cosine, a
  gap). Skewed positive errors fitted raw give the Gaussians the wrong shape.
- Centre: the median of each side's shadow scores (`CENTRE`), as the script's `np.median`
  (`generate_ours`, `generate_ours_offline`); `centre="mean"` is the moment estimate.
- Spread: per sample, the standard deviation about the sample's mean (the script: `np.std`,
  per sample). With few shadows (fewer than `FIXED_VARIANCE_BELOW`), or fewer than `min_count`
  on a side, one global value per side instead, as the paper recommends for few shadows. The
  script's `fix_variance=True` takes `np.std` of *all* the side's scores, spread between samples
  included (and, online, the IN value for both sides); we pool the spread *within* samples (the
  residuals about each sample's own mean), an estimate of the per-sample spread it replaces. With
  one global value the offline ranking does not depend on which value it is, the p-values and
  thresholds do.
- Offline score: the paper's one-sided test, -log P(Z >= x); the script scores offline by the
  two-sided OUT log-density. Online: the script's likelihood ratio (it averages it over
  augmentations; a query here has none).

Both need every shadow's score on the target's own query samples (matched by sample_id):
offline LiRA needs OUT scores only, which the default splits give once each shadow is also
queried on the target's samples (none of them trained on the target pool: all OUT); online
LiRA needs IN scores too, i.e. shadows that train on part of the target pool
(`shadow_pool: auxiliary+queries`).

    scores = lira_scores(target, shadows, "loss/mean", online=True, scale="log")  # (S,)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_mia.query.shards import QueryTable
from lightning_mia.specs.attacks import AttackError

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
FIXED_VARIANCE_BELOW = 64  # fewer shadows than this: one global variance per side
CENTRE = "median"  # each side's centre: the median of its shadow scores, as Carlini's script
_TINY = 1e-12  # log and logit floor: a score at (or past) the edge of its scale


def to_scale(x: torch.Tensor, scale: str) -> torch.Tensor:
    """Scores (float64) on the scale LiRA fits: `log` (positive errors, floored at 1e-12),
    `logit` (probabilities, clamped into (1e-12, 1 - 1e-12)), `identity`."""
    x = x.double()
    if scale == "log":
        return x.clamp(min=_TINY).log()
    if scale == "logit":
        return torch.logit(x, eps=_TINY)
    if scale == "identity":
        return x
    raise ValueError(f"unknown score scale {scale!r}; known: identity, log, logit")


def off_scale(x: torch.Tensor, scale: str) -> int:
    """How many scores lie outside the domain of `scale` (clamped by `to_scale`)."""
    if scale == "log":
        return int((x <= 0).sum())
    if scale == "logit":
        return int(((x <= 0) | (x >= 1)).sum())
    return 0


@dataclass(frozen=True)
class Gaussians:
    """Per-sample IN / OUT Gaussians, each (S,), and how many shadows each side rests on
    (`mean_*` hold each side's centre: the median by default)."""

    mean_in: torch.Tensor
    std_in: torch.Tensor
    mean_out: torch.Tensor
    std_out: torch.Tensor
    n_in: torch.Tensor  # (S,) int
    n_out: torch.Tensor  # (S,) int


def _side(
    scores: torch.Tensor,
    mask: torch.Tensor,
    min_count: int,
    fixed_variance: bool,
    centre: str = CENTRE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centre (S,), std (S,) and count (S,) of the masked entries of scores (M, S), per column.

    The std is about each column's mean (pooled over columns where global); the centre is the
    median (the mean of the two middle values for an even count) or the mean."""
    m = mask.double()
    n = m.sum(0)  # (S,)
    mean = (scores * m).sum(0) / n.clamp(min=1)
    resid = (scores - mean) * m  # (M, S), zero where unobserved
    var = (resid**2).sum(0) / (n - 1).clamp(min=1)
    dof = (n - 1).clamp(min=0).sum()
    global_var = (resid**2).sum() / dof if dof > 0 else torch.tensor(math.nan)
    use_global = torch.full_like(n, True, dtype=torch.bool) if fixed_variance else n < min_count
    var = torch.where(use_global, global_var, var)
    if centre == "median":
        masked = torch.where(mask, scores, torch.nan)
        mean = torch.nanquantile(masked, 0.5, dim=0) if scores.shape[1] else mean
    elif centre != "mean":
        raise ValueError(f"unknown LiRA centre {centre!r}; known: median, mean")
    mean = torch.where(n > 0, mean, torch.nan)
    return mean, var.clamp(min=1e-12).sqrt(), n.long()


def fit_gaussians(
    scores: torch.Tensor,
    is_in: torch.Tensor,
    observed: torch.Tensor | None = None,
    min_count: int = 4,
    fixed_variance: bool = False,
    centre: str = CENTRE,
) -> Gaussians:
    """Fit IN/OUT Gaussians per sample from shadow scores (M, S) and membership (M, S).

    `observed` (M, S) marks which shadow scored which sample (default: all). Each side's centre
    is the median (or mean) of its scores. A side with fewer than `min_count` shadows, or every
    side when `fixed_variance`, uses the global variance.
    A sample no OUT shadow saw gets the average OUT mean; one no IN shadow saw gets its OUT
    mean plus the average IN-OUT shift.
    """
    scores = scores.double()
    min_count = max(min_count, 2)  # one score has no spread of its own
    observed = torch.ones_like(is_in, dtype=torch.bool) if observed is None else observed.bool()
    is_in = is_in.bool()
    mean_in, std_in, n_in = _side(scores, is_in & observed, min_count, fixed_variance, centre)
    mean_out, std_out, n_out = _side(scores, ~is_in & observed, min_count, fixed_variance, centre)
    if not (n_out > 0).any():
        raise AttackError("LiRA: no shadow model left out any of the samples (no OUT scores)")
    mean_out = torch.where(n_out > 0, mean_out, mean_out[n_out > 0].mean())
    both = (n_in > 0) & (n_out > 0)
    shift = (mean_in[both] - mean_out[both]).mean() if both.any() else torch.tensor(math.nan)
    mean_in = torch.where(n_in > 0, mean_in, mean_out + shift)
    std_in = torch.where(std_in.isnan(), std_out, std_in)  # no IN spread at all: borrow OUT's
    return Gaussians(mean_in, std_in, mean_out, std_out, n_in, n_out)


def _log_normal(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return -0.5 * ((x - mean) / std) ** 2 - std.log() - _LOG_SQRT_2PI


def lira_offline(x: torch.Tensor, g: Gaussians) -> torch.Tensor:
    """-log P(Z >= x) under the OUT Gaussian, (S,): large when x is far above what OUT gives."""
    return -torch.special.log_ndtr((g.mean_out - x.double()) / g.std_out)


def lira_online(x: torch.Tensor, g: Gaussians) -> torch.Tensor:
    """Log-likelihood ratio IN vs OUT, (S,); NaN where no IN statistics exist at all."""
    x = x.double()
    return _log_normal(x, g.mean_in, g.std_in) - _log_normal(x, g.mean_out, g.std_out)


def direction_of(scores: torch.Tensor, is_in: torch.Tensor, observed: torch.Tensor) -> int:
    """+1 if IN shadow scores are larger on average than OUT ones, else -1."""
    inside, outside = is_in & observed, ~is_in & observed
    if not inside.any() or not outside.any():
        return 1
    return 1 if scores[inside].mean() >= scores[outside].mean() else -1


def score_matrix(
    ids: torch.Tensor, tables: Sequence[QueryTable], values: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, is_in, observed), each (M, S): `values[m]` (one per row of `tables[m]`) at each
    of the sample ids (S,) sorted, with table m's membership; unobserved entries are 0/False."""
    m, s = len(tables), ids.numel()
    scores = torch.zeros(m, s, dtype=torch.float64)
    is_in = torch.zeros(m, s, dtype=torch.bool)
    observed = torch.zeros(m, s, dtype=torch.bool)
    for i, (table, value) in enumerate(zip(tables, values)):
        pos = torch.searchsorted(table.sample_id, ids).clamp(max=len(table) - 1)  # (S,)
        hit = table.sample_id[pos] == ids
        observed[i] = hit
        scores[i, hit] = value[pos[hit]].double()
        is_in[i, hit] = table.is_member[pos[hit]]
    return scores, is_in, observed


def shadow_score_matrix(
    target: QueryTable, shadows: Sequence[QueryTable], feature: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scores, is_in, observed), each (M, S): shadow m's `feature` for target sample s."""
    for i, shadow in enumerate(shadows):
        if feature not in shadow.features:
            raise AttackError(f"LiRA: shadow {shadow.record.run_name or i} lacks {feature}")
    return score_matrix(target.sample_id, shadows, [t.features[feature] for t in shadows])


def calibrate(
    x: torch.Tensor,
    scores: torch.Tensor,
    is_in: torch.Tensor,
    observed: torch.Tensor,
    online: bool,
    fixed_variance: bool,
    min_count: int = 4,
    centre: str = CENTRE,
) -> tuple[torch.Tensor, Gaussians]:
    """LiRA scores (S,) of target scores x (S,) (higher = member) against shadow scores (M, S)
    of the same orientation and scale, and the Gaussians they rest on."""
    g = fit_gaussians(scores, is_in, observed, min_count, fixed_variance, centre)
    return (lira_online(x, g) if online else lira_offline(x, g)), g


def lira_scores(
    target: QueryTable,
    shadows: Sequence[QueryTable],
    feature: str,
    online: bool = True,
    min_count: int = 4,
    fixed_variance: bool = False,
    scale: str = "identity",
    centre: str = CENTRE,
) -> torch.Tensor:
    """Calibrated member scores (S,) of the target's rows for one scalar `feature`, fitted on
    `scale` (`to_scale`)."""
    if feature not in target.features:
        raise AttackError(f"LiRA: target {target.record.run_name} lacks {feature}")
    scores, is_in, observed = shadow_score_matrix(target, shadows, feature)
    scores = to_scale(scores, scale)
    if not observed.any():
        raise AttackError(
            "LiRA: no shadow model was queried on any of the target's samples; calibration needs "
            "shadows trained on random halves of the target's own query pool"
        )
    sign = direction_of(scores, is_in, observed)
    x = sign * to_scale(target.features[feature], scale)
    return calibrate(x, sign * scores, is_in, observed, online, fixed_variance, min_count, centre)[
        0
    ]
