"""AttackModule, attack data and the threshold baseline on synthetic features (CPU, seconds)."""

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_mia.attack.baselines import fit_threshold_baseline
from lightning_mia.attack.data import AttackDataModule, Rows, stratified_split
from lightning_mia.attack.module import AttackModule, fit_attack
from lightning_mia.metrics import bootstrap_interval, roc_auc
from lightning_mia.query.shards import QueryTable
from lightning_mia.specs.attacks import ATTACKS, QueryCosts, paper_attacks, query_feature_groups
from lightning_mia.specs.query import QueryRecord


def _rows(n, separation, seed, num_features=6):
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < 0.5).float()
    x = torch.randn(n, num_features, generator=g)
    x[:, 0] += separation * y
    x[:, 1] = 50.0 + 20.0 * x[:, 1]  # badly scaled column: the standardiser must cope
    return x, y


def _fit(x, y, folder, max_epochs=25):
    keep, held = stratified_split(y, 0.2, seed=0)
    dm = AttackDataModule((x[keep], y[keep]), (x[held], y[held]))
    names = [f"pixel/f{i}" for i in range(x.shape[1])]
    module = AttackModule(x.shape[1], hidden=(32, 32), feature_names=names)
    return fit_attack(module, dm, folder, max_epochs=max_epochs, progress=False)


def test_separable_members_are_found(tmp_path):
    x, y = _rows(600, separation=4.0, seed=0)
    xt, yt = _rows(400, separation=4.0, seed=1)
    best = _fit(x, y, tmp_path)
    assert float(roc_auc(best.score(xt), yt.bool())) > 0.95


def test_noise_stays_at_chance(tmp_path):
    x, y = _rows(600, separation=0.0, seed=2)
    xt, yt = _rows(600, separation=0.0, seed=3)
    scores = _fit(x, y, tmp_path, max_epochs=10).score(xt)
    low, high = bootstrap_interval(roc_auc, scores, yt.bool(), n_boot=300, seed=0)
    assert low < 0.5 < high


def test_saved_attack_reloads_with_its_standardiser(tmp_path, log):
    x, y = _rows(300, separation=3.0, seed=4)
    best = _fit(x, y, tmp_path, max_epochs=5)
    path = tmp_path / "best.ckpt"
    assert path.is_file()
    assert "weights_only" not in log.text  # Lightning's line when the call leaves it unset
    again = AttackModule.load_from_checkpoint(path, weights_only=True)
    assert again.mean[1] == pytest.approx(float(x[:, 1].mean()), rel=0.2)  # fitted, not 0
    assert torch.equal(again.mean, best.mean) and torch.equal(again.std, best.std)
    assert list(again.hparams.feature_names) == [f"pixel/f{i}" for i in range(6)]
    # reloaded float32 weights, the same input: the default tolerance (1.3e-6 relative)
    torch.testing.assert_close(again.score(x), best.score(x))
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    dm = AttackDataModule((x, y), (x, y), test=(x, y), batch_size=128)
    probs = torch.cat(trainer.predict(again, datamodule=dm))
    # batches of 128 vs one of 300 through a small float32 MLP: within the default tolerance
    torch.testing.assert_close(probs, torch.sigmoid(best.score(x)))


def test_stratified_split_is_seeded_disjoint_and_stratified():
    y = torch.tensor([1.0] * 30 + [0.0] * 70)
    strata = torch.arange(100) % 2
    keep, held = stratified_split(y, 0.2, seed=5, strata=strata)
    assert set(keep.tolist()).isdisjoint(held.tolist())
    assert sorted(keep.tolist() + held.tolist()) == list(range(100))
    assert int(y[held].sum()) == 6 and held.numel() == 20
    assert int(strata[held].sum()) == 10
    again = stratified_split(y, 0.2, seed=5, strata=strata)
    assert torch.equal(held, again[1])
    assert not torch.equal(held, stratified_split(y, 0.2, seed=6, strata=strata)[1])


def _table(features, member, run_name):
    n = member.numel()
    return QueryTable(
        torch.arange(n), member, 1, features=features, record=QueryRecord(run_name=run_name)
    )


def test_rows_stack_tables_and_name_what_is_missing():
    member = torch.tensor([True, False, True])
    feats = {
        "pixel/mse": torch.ones(3),
        "text/clip": torch.zeros(3),
        "quality/brisque": torch.ones(3),
        "blind/len": torch.ones(3),
    }
    rows = Rows.stack([_table(feats, member, "a"), _table(feats, member, "b")])
    names, problems = rows.check(ATTACKS["text"].groups)
    assert names == ["quality/brisque", "text/clip"] and not problems
    assert rows.matrix(names).shape == (6, 2)
    assert torch.equal(rows.labels, torch.tensor([1.0, 0, 1, 1, 0, 1]))
    assert rows.source.tolist() == [0, 0, 0, 1, 1, 1]
    assert rows.take(torch.tensor([4])).sample_id.tolist() == [1]
    partial = {k: v for k, v in feats.items() if k != "text/clip"}
    nan = {**feats, "pixel/mse": torch.tensor([0.0, float("nan"), 1.0])}
    rows = Rows.stack([_table(nan, member, "a"), _table(partial, member, "diffusion-shadow-002")])
    names, problems = rows.check(ATTACKS["combined"].groups)
    assert "text/clip" in names and "text/clip" not in rows.features
    assert problems == ["a has NaN/inf values in pixel/mse", "diffusion-shadow-002 lacks text/clip"]
    assert rows.check(("semantic",)) == ([], ["no features of groups ['semantic'] in any shard"])


def test_registry_matches_the_feature_contract():
    assert ATTACKS["combined"].groups == ("pixel", "semantic", "text", "quality")
    costs = QueryCosts(num_images=4, signal_queries={"loss": 3})
    assert ATTACKS["blind"].queries(costs) == 0
    assert ATTACKS["pixel"].queries(costs) == 4
    assert ATTACKS["loss"].access == "gray-box" and ATTACKS["loss"].queries(costs) == 3
    assert ATTACKS["pia"].queries(costs) is None  # not measured: unknown, not 0
    assert paper_attacks() == ["pixel", "semantic", "text", "combined"]
    assert set(query_feature_groups()) == {
        "pixel",
        "semantic",
        "text",
        "quality",
        "blind",
        "complexity",  # no attack of its own: it calibrates the reconstruction errors
    }


def test_threshold_baseline_picks_direction_and_feature():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(400, generator=g) < 0.5).float()
    x = torch.randn(400, 3, generator=g)
    x[:, 2] -= 2.0 * y  # smaller = member: the strongest feature, negative direction
    x[:, 0] += 0.5 * y
    best = fit_threshold_baseline(x, y, ["pixel/a", "pixel/b", "pixel/c"])[0]
    assert best.feature == "pixel/c" and best.direction == -1
    signed = best.scores(x, ["pixel/a", "pixel/b", "pixel/c"])
    accuracy = float(((signed >= best.threshold).float() == y).float().mean())
    assert accuracy > 0.8 and best.train_auc > 0.85
