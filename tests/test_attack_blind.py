"""The blind diagnostic on real images: near chance on an IID split, finds a real shift.

Features come from the real feature path (`FeatureExtractor(..., groups=["blind"])`) over the
embedded shapes data, with a random-init tiny CLIP encoder (no download); the split with a
shift takes the brighter images as members, as a benchmark whose members and non-members come
from different collections would.
"""

import pytest
import torch
from transformers import CLIPModel

from lightning_mia.attack.blind import BLIND_FOLDS, blind_diagnostic, reduce_embeddings
from lightning_mia.attack.data import Rows, stratified_folds
from lightning_mia.attack.training import FitOptions
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.features import FeatureExtractor
from lightning_mia.metrics import evaluate
from lightning_mia.models.encoder import ImageTextEncoder, clip_config
from lightning_mia.models.tokenizers import load_clip_tokenizer
from lightning_mia.query.shards import QueryTable

N = 240
FIT = FitOptions(max_epochs=20, patience=8, progress=False)


@pytest.fixture(scope="module")
def blind_rows():
    """(features of N shapes images and captions, their mean brightness)."""
    torch.manual_seed(0)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    source = ShapesSource(num_samples=N, resolution=32, seed=3)
    images = torch.stack([source.image(i) for i in range(N)]).float() / 127.5 - 1  # (N, 3, 32, 32)
    captions = [source.caption(i) for i in range(N)]
    tokenizer = load_clip_tokenizer("", 128)
    encoder = ImageTextEncoder(CLIPModel(clip_config("tiny", tokenizer)).eval(), tokenizer)
    extractor = FeatureExtractor(encoder, groups=["blind"])
    features = extractor(images, images[:, None], captions)  # generated images are unused
    torch.set_num_threads(old)
    return features, images.mean(dim=(1, 2, 3))


def _diagnose(features, member, folder):
    table = QueryTable(torch.arange(N), member, 0, features=features)
    rows = Rows.stack([table])
    names, problems = rows.check(("blind",))
    assert not problems
    cv = blind_diagnostic(rows, names, folder, "shadow", seed=0, fit=FIT)
    return cv, evaluate(cv.scores, cv.labels, 0.0, n_boot=200)["auc"]


def test_blind_features_carry_the_whole_embeddings(blind_rows):
    features, _ = blind_rows
    assert sum(n.startswith("blind/img_emb_") for n in features) == 64  # tiny encoder: D = 64
    assert sum(n.startswith("blind/txt_emb_") for n in features) == 64


def test_iid_split_sits_near_chance(blind_rows, tmp_path, log):
    features, _ = blind_rows
    member = torch.zeros(N, dtype=torch.bool)
    member[torch.randperm(N, generator=torch.Generator().manual_seed(1))[: N // 2]] = True
    cv, auc = _diagnose(features, member, tmp_path / "blind")
    assert auc.low < 0.5 < auc.high and 0.35 < auc.value < 0.65, auc
    assert sorted(cv.sample_id.tolist()) == list(range(N))  # every row scored, out of fold
    assert (tmp_path / "blind" / f"shadow-fold{BLIND_FOLDS - 1}.ckpt").is_file()
    assert "blind/img_emb_* (64 coordinates -> 8 principal components)" in cv.features
    # one line for the folds (it was one per fold, for each blind row and caption control)
    said = {r.getMessage(): 0 for r in log.records if r.getMessage().startswith("attack/")}
    assert list(said) == [
        f"attack/blind: {BLIND_FOLDS}-fold cross-validation on {N} rows, 26 features"
    ]


def test_a_real_shift_is_found(blind_rows, tmp_path):
    features, brightness = blind_rows
    member = brightness > brightness.median()  # members: the brighter half of the images
    _, auc = _diagnose(features, member, tmp_path)
    assert auc.value > 0.85 and auc.low > 0.75, auc


def test_folds_are_seeded_stratified_and_cover_every_row():
    y = torch.tensor([1.0] * 23 + [0.0] * 41)
    fold = stratified_folds(y, 5, seed=2)
    assert torch.equal(fold, stratified_folds(y, 5, seed=2))
    assert not torch.equal(fold, stratified_folds(y, 5, seed=3))
    for k in range(5):
        members, size = int(y[fold == k].sum()), int((fold == k).sum())
        assert members in (4, 5) and size in (12, 13)


def test_principal_components_are_fitted_on_the_training_rows_only():
    g = torch.Generator().manual_seed(0)
    names = ["blind/mean_r", *(f"blind/img_emb_{i}" for i in range(10))]
    train, test = torch.randn(30, 11, generator=g), torch.randn(6, 11, generator=g)
    a, b, used = reduce_embeddings(train, test, names, k=3)
    assert used == ["blind/mean_r", "blind/img_emb_pc0", "blind/img_emb_pc1", "blind/img_emb_pc2"]
    assert a.shape == (30, 4) and b.shape == (6, 4)
    assert torch.equal(a[:, 0], train[:, 0])  # other features pass through
    a2, _, _ = reduce_embeddings(train, test * 100, names, k=3)
    assert torch.equal(a, a2)  # the held-out rows choose nothing
    variances = a[:, 1:].var(0)
    assert (variances[:-1] >= variances[1:]).all()  # leading components first
