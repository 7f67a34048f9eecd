"""The public pool: disjoint from the target pool and from the pool the shadows draw from, seeded,
recorded in splits.json only when asked (splits without it keep their hash)."""

import json

import pytest

from lightning_mia.data import DataError, ShapesSource, ensure_splits, load_splits, make_splits
from lightning_mia.paths import ExperimentLayout


@pytest.mark.parametrize("shadow_pool", ["auxiliary", "auxiliary+queries"])
def test_public_pool_is_disjoint_from_everything_a_model_trains_or_is_queried_on(shadow_pool):
    splits = make_splits(
        ShapesSource(500),
        num_shadows=3,
        target_size=64,
        aux_size=200,
        public_size=150,
        shadow_size=64,
        shadow_pool=shadow_pool,
    )
    public = set(splits.pool("public"))
    assert len(public) == 150 and splits.pool("public") == sorted(public)
    assert not public & set(splits.target_pool) and not public & set(splits.aux_pool)
    for row in splits.rows:
        assert not public & set(row.queries)
    assert splits.pool("target") == splits.target_pool
    assert splits.pool("auxiliary") == splits.aux_pool
    assert splits.config["public_size"] == 150


def test_public_draw_is_seeded_and_leaves_given_pools_in_place():
    kwargs = {"num_shadows": 2, "target_size": 40, "aux_size": 100}
    plain = make_splits(ShapesSource(300), **kwargs)
    with_public = make_splits(ShapesSource(300), **kwargs, public_size=100)
    again = make_splits(ShapesSource(300), **kwargs, public_size=100)
    other_seed = make_splits(ShapesSource(300), **kwargs, public_size=100, seed=1)
    assert with_public.to_dict() == again.to_dict()
    assert with_public.public_pool != other_seed.public_pool
    # the public pool comes after the other two in the same seeded order: adding it moves nothing
    assert with_public.target_pool == plain.target_pool and with_public.aux_pool == plain.aux_pool
    assert with_public.rows == plain.rows and with_public.hash != plain.hash
    # sizes left to default split what the public pool leaves
    halves = make_splits(ShapesSource(300), num_shadows=1, public_size=100)
    assert len(halves.target_pool) == len(halves.aux_pool) == 100


def test_public_pool_round_trips_and_is_checked(tmp_path):
    layout = ExperimentLayout(tmp_path / "exp")
    splits = ensure_splits(layout, ShapesSource(200), num_shadows=1, public_size=50)
    stored = json.loads(layout.splits.read_text())
    assert stored["public_pool"] == splits.public_pool and stored["config"]["public_size"] == 50
    assert load_splits(layout.splits, ShapesSource(200)) == splits
    with pytest.raises(DataError, match=r"public_size=50 \(asked None\)"):
        ensure_splits(layout, ShapesSource(200), num_shadows=1)
    ensure_splits(tmp_path / "plain", ShapesSource(200), num_shadows=1)
    with pytest.raises(DataError, match=r"public_size=None \(asked 20\)"):
        ensure_splits(tmp_path / "plain", ShapesSource(200), num_shadows=1, public_size=20)


def test_without_public_size_nothing_changes(tmp_path):
    splits = make_splits(ShapesSource(200), num_shadows=2)
    assert splits.public_pool is None and "public_pool" not in splits.to_dict()
    assert "public_size" not in splits.config
    with pytest.raises(DataError, match="no public pool: make them with public_size"):
        splits.pool("public")
    with pytest.raises(DataError, match="pool must be one of"):
        splits.pool("members")
