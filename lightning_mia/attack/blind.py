"""The blind diagnostic: the blind baseline cross-validated on the target's own query rows.

    rows = Rows.stack([target])
    names, _ = rows.check(("blind",))
    cv = blind_diagnostic(rows, names, layout.attack / "blind", "shadow", 0, FitOptions())
    cv.scores  # (S,) out-of-fold member logits of every target row

A classifier on the query image and caption alone (`blind/*`, no model query) trained on the
shadows cannot see a shift between the *target's* members and non-members: the shadows' halves
are IID by construction. So this one is trained and tested on the target's rows themselves, by
seeded, stratified k-fold cross-validation: each fold is scored by the AttackModule fitted on the
other folds (early-stopped on a held-out part of those), and the metrics are read from the
pooled out-of-fold scores. It is a diagnostic of the benchmark, not an attack (it uses target
labels, which no attack does): near 0.5 on an IID split; well above it when members and
non-members differ in distribution, which inflates every attack's figures by as much. It runs in
every setting, on all of the target's rows.

Features: every `blind/*` scalar (colour statistics, high-frequency energy, caption-image
cosine, caption length) and the image and text embeddings, each reduced to
`EMBEDDING_COMPONENTS` principal components fitted on the training folds only (an MLP on all D
coordinates of a few hundred rows would fit noise; the leading components carry the directions
in which the rows differ most, where a shift of the sample populations shows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_mia.attack.data import Rows, stratified_folds
from lightning_mia.attack.training import FitOptions, fit_on_rows
from lightning_mia.features.blind import EMBEDDING_PREFIXES

BLIND_FOLDS = 5
EMBEDDING_COMPONENTS = 8  # principal components kept per embedding (image, text)


@dataclass(frozen=True)
class BlindDiagnostic:
    """Out-of-fold scores of the target's rows and what produced them."""

    scores: torch.Tensor  # (S,) float32 member logits, each from the model not fitted on it
    labels: torch.Tensor  # (S,) bool
    sample_id: torch.Tensor  # (S,) int64
    features: list[str]  # the inputs, embeddings summarised
    details: dict[str, Any] = field(default_factory=dict)


def principal_components(
    train: torch.Tensor, test: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both (n, D) / (m, D) projected onto the top-k principal axes of `train`: (n, k), (m, k)."""
    mean = train.double().mean(0)
    _, _, vh = torch.linalg.svd(train.double() - mean, full_matrices=False)  # vh (min(n,D), D)
    basis = vh[:k].T  # (D, k)
    return ((train.double() - mean) @ basis).float(), ((test.double() - mean) @ basis).float()


def reduce_embeddings(
    train: torch.Tensor, test: torch.Tensor, names: Sequence[str], k: int
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Replace each embedding's coordinates (EMBEDDING_PREFIXES) by its top-k principal
    components fitted on `train`; other columns pass through. Returns (train, test, names)."""
    plain = [j for j, n in enumerate(names) if not n.startswith(EMBEDDING_PREFIXES)]
    parts_train, parts_test = [train[:, plain]], [test[:, plain]]
    out_names = [names[j] for j in plain]
    for prefix in EMBEDDING_PREFIXES:
        cols = [j for j, n in enumerate(names) if n.startswith(prefix)]
        if not cols:
            continue
        keep = min(k, len(cols), train.shape[0] - 1)
        a, b = principal_components(train[:, cols], test[:, cols], keep)
        parts_train.append(a)
        parts_test.append(b)
        out_names += [f"{prefix}pc{i}" for i in range(keep)]
    return torch.cat(parts_train, 1), torch.cat(parts_test, 1), out_names


def _described(names: Sequence[str], k: int) -> list[str]:
    """The input features, each embedding as one entry: `blind/img_emb_* (64 -> 8 PCs)`."""
    out = [n for n in names if not n.startswith(EMBEDDING_PREFIXES)]
    for prefix in EMBEDDING_PREFIXES:
        d = sum(n.startswith(prefix) for n in names)
        if d:
            out.append(f"{prefix}* ({d} coordinates -> {min(k, d)} principal components)")
    return out


def blind_diagnostic(
    rows: Rows,
    names: Sequence[str],
    folder: Path,
    setting: str,
    seed: int,
    fit: FitOptions,
    folds: int = BLIND_FOLDS,
    components: int = EMBEDDING_COMPONENTS,
) -> BlindDiagnostic:
    """Stratified `folds`-fold cross-validation of the blind features `names` on `rows` (the
    target's); fold k's classifier is `<folder>/<setting>-fold<k>.ckpt`, its metrics are logged
    as `attack/<folder name>/fold<k>/...` (the diagnostic's name: blind, blind-caption)."""
    x, y = rows.matrix(names), rows.labels  # (S, F), (S,)
    fold = stratified_folds(y, folds, seed)
    scores = torch.zeros(len(rows))
    for k in range(folds):
        test, train = fold == k, fold != k
        xa, xb, used = reduce_embeddings(x[train], x[test], names, components)
        if k == 0:  # one line for the folds (each fold's features are alike in number)
            rank_zero_info(
                f"attack/{folder.name}: {folds}-fold cross-validation on {len(rows)} rows, "
                f"{len(used)} features"
            )
        model = fit_on_rows(
            xa,
            y[train],
            used,
            folder,
            f"{setting}-fold{k}",
            seed,
            fit,
            prefix=f"attack/{folder.name}/fold{k}",
            announce=False,
        )
        scores[test] = model.score(xb)
    details = {
        "diagnostic": (
            "a diagnostic of the benchmark, not an attack: the query image and caption alone, "
            f"{folds}-fold stratified cross-validation on the target's own query rows "
            "(out-of-fold scores); near 0.5 when members and non-members are alike"
        ),
        "folds": folds,
        "embedding_components": components,
        "rows": len(rows),
    }
    return BlindDiagnostic(
        scores, rows.is_member, rows.sample_id, _described(names, components), details
    )
