"""The aggregation of a set-level audit: many per-sample features -> one score per sample.

    scorer = fit_scorer(x_fit, y_fit, names, l2=1.0, components=8)   # (n, F), (n,) 0/1
    scores = scorer.score(x)                                          # (m,) log-odds

A linear model, because a set-level test needs a score whose direction is learned and fixed
before the tested samples are seen, and a few hundred fitting rows support little more:

1. embedding coordinates (`blind/img_emb_*`, `blind/txt_emb_*`) are replaced by their leading
   `components` principal components, fitted on the fitting rows only;
2. every column is standardised by the fitting rows' mean and standard deviation; a column that
   is constant there is dropped (it cannot inform the fit);
3. L2-regularised logistic regression (penalty `l2 / 2 * |w|^2`, intercept unpenalised; the
   optimum of scikit-learn's `LogisticRegression(C=1/l2)`), fitted by Newton's method.

The score is the model's log-odds (its linear predictor), not its probability: the same ranking,
but nearer to normal, which suits the t-test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_mia.features.blind import EMBEDDING_PREFIXES

NEWTON_STEPS = 100
NEWTON_TOL = 1e-12  # stop when the Newton decrement is below this (per row)
HALVINGS = 30  # step halvings tried before a step is taken anyway


@dataclass(frozen=True)
class Projection:
    """One embedding's coordinates -> its leading principal components."""

    prefix: str
    columns: np.ndarray  # (D,) int indices into the input matrix
    mean: np.ndarray  # (D,)
    basis: np.ndarray  # (D, k)


@dataclass(frozen=True)
class Scorer:
    """A fitted aggregation: `score(x)` for rows of the input columns `names`."""

    names: tuple[str, ...]  # input columns, in order
    plain: np.ndarray  # indices of the columns kept as they are
    projections: tuple[Projection, ...]
    used: tuple[str, ...]  # columns after reduction, dropping constant ones
    keep: np.ndarray  # (U,) indices into the reduced columns that are used
    mean: np.ndarray  # (U,)
    scale: np.ndarray  # (U,)
    coef: np.ndarray  # (U,) on the standardised columns
    intercept: float

    def reduce(self, x: np.ndarray) -> np.ndarray:
        """(n, F) input -> (n, R) plain columns and principal components (before `keep`)."""
        parts = [x[:, self.plain]]
        parts += [(x[:, p.columns] - p.mean) @ p.basis for p in self.projections]
        return np.concatenate(parts, axis=1)

    def score(self, x: np.ndarray) -> np.ndarray:
        """(n, F) -> (n,) log-odds of "member" (higher = more member-like)."""
        z = (self.reduce(np.asarray(x, dtype=np.float64))[:, self.keep] - self.mean) / self.scale
        return z @ self.coef + self.intercept


def principal_basis(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), basis (D, k')) of the top k' = min(k, D, n - 1) principal axes of (n, D)."""
    mean = x.mean(axis=0)
    _, _, vh = np.linalg.svd(x - mean, full_matrices=False)  # vh (min(n, D), D)
    keep = max(0, min(k, x.shape[1], x.shape[0] - 1))
    return mean, vh[:keep].T


def _penalised_loss(design: np.ndarray, y: np.ndarray, theta: np.ndarray, pen: np.ndarray) -> float:
    z = design @ theta
    return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(pen * theta**2))


def logistic_regression(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """(w, b) minimising sum_i logloss(y_i, x_i w + b) + l2 / 2 |w|^2, by damped Newton steps.

    x (n, U) float64, y (n,) in {0, 1}; l2 > 0 makes the optimum unique and finite even when
    the classes are separable. Each step is halved until the objective decreases, so it
    converges from any start.
    """
    n, u = x.shape
    design = np.concatenate([x, np.ones((n, 1))], axis=1)  # (n, U + 1), intercept last
    pen = np.full(u + 1, l2)
    pen[-1] = 0.0  # the intercept is not penalised
    theta = np.zeros(u + 1)
    rate = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    theta[-1] = np.log(rate / (1 - rate))
    loss = _penalised_loss(design, y, theta, pen)
    for _ in range(NEWTON_STEPS):
        p = 0.5 * (1.0 + np.tanh(0.5 * (design @ theta)))  # sigmoid, without overflow
        grad = design.T @ (p - y) + pen * theta
        # einsum, not BLAS: threaded BLAS on matrices this small is slower on a busy machine
        hess = np.einsum("ni,nj->ij", design * (p * (1 - p))[:, None], design) + np.diag(pen)
        hess[-1, -1] += 1e-9  # one class only: the intercept's curvature vanishes
        step = np.linalg.solve(hess, grad)
        if float(grad @ step) < NEWTON_TOL * n:  # Newton decrement: at the optimum
            break
        for _ in range(HALVINGS):
            new = _penalised_loss(design, y, theta - step, pen)
            if new <= loss:
                break
            step = step / 2
        theta, loss = theta - step, new
    return theta[:-1], float(theta[-1])


def _projections(
    x: np.ndarray, names: Sequence[str], components: int
) -> tuple[np.ndarray, tuple[Projection, ...], list[str]]:
    plain = [j for j, n in enumerate(names) if not n.startswith(EMBEDDING_PREFIXES)]
    used = [names[j] for j in plain]
    projections = []
    for prefix in EMBEDDING_PREFIXES:
        cols = np.array([j for j, n in enumerate(names) if n.startswith(prefix)], dtype=np.int64)
        if not len(cols):
            continue
        mean, basis = principal_basis(x[:, cols], components)
        projections.append(Projection(prefix, cols, mean, basis))
        used += [f"{prefix}pc{i}" for i in range(basis.shape[1])]
    return np.array(plain, dtype=np.int64), tuple(projections), used


def fit_scorer(
    x: np.ndarray, y: np.ndarray, names: Sequence[str], l2: float = 1.0, components: int = 8
) -> Scorer:
    """Fit the aggregation on (n, F) rows `x` with labels `y` (1 = member or suspect)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape != (len(y), len(names)):
        raise ValueError(f"expected x ({len(y)}, {len(names)}), got {x.shape}")
    plain, projections, reduced_names = _projections(x, names, components)
    partial = Scorer(tuple(names), plain, projections, (), np.zeros(0, np.int64), *_EMPTY)
    reduced = partial.reduce(x)
    scale = reduced.std(axis=0)
    keep = np.flatnonzero(scale > 0)
    mean, scale = reduced[:, keep].mean(axis=0), scale[keep]
    coef, intercept = logistic_regression((reduced[:, keep] - mean) / scale, y, l2)
    used = tuple(reduced_names[j] for j in keep)
    return Scorer(tuple(names), plain, projections, used, keep, mean, scale, coef, intercept)


_EMPTY = (np.zeros(0), np.ones(0), np.zeros(0), 0.0)  # mean, scale, coef, intercept
