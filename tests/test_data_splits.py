"""Membership splits: deterministic, disjoint pools, independent shadows, tamper and data checks."""

import json

import pytest
from PIL import Image

from lightning_mia.data import (
    DataError,
    ImageFolderSource,
    ShapesSource,
    ensure_splits,
    load_splits,
    make_splits,
    save_splits,
)
from lightning_mia.paths import ExperimentLayout


@pytest.fixture(autouse=True)
def _digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MIA_CACHE", str(tmp_path / "cache"))


def write_folder(root, n, start=0):
    root.mkdir(exist_ok=True)
    rows = []
    for k in range(start, start + n):
        Image.new("RGB", (8, 8), (k, 2 * k, 3 * k)).save(root / f"{k}.png")
        rows.append({"id": k, "file_name": f"{k}.png", "text": f"caption {k}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_same_seed_same_splits_other_seed_other():
    src = ShapesSource(200)
    a, b = make_splits(src, num_shadows=3, seed=1), make_splits(ShapesSource(200), 3, seed=1)
    c = make_splits(src, num_shadows=3, seed=2)
    assert a.to_dict() == b.to_dict() and a.hash == b.hash
    assert c.hash != a.hash and c.rows[0].members != a.rows[0].members
    assert c.target_pool != a.target_pool


def test_pools_and_rows():
    splits = make_splits(ShapesSource(200), num_shadows=4, seed=0)
    target, aux = set(splits.target_pool), set(splits.aux_pool)
    assert not target & aux and len(target) == len(aux) == 100
    assert target | aux == set(range(200))
    assert splits.num_models == 5 and splits.num_shadows == 4
    for k, row in enumerate(splits.rows):
        pool = target if k == 0 else aux
        assert row.members == sorted(row.members) and row.nonmembers == sorted(row.nonmembers)
        assert not set(row.members) & set(row.nonmembers)
        assert set(row.members) | set(row.nonmembers) == pool
        assert len(row.members) == len(row.nonmembers) == 50
        assert row.queries == sorted(pool)
        assert row.is_member() == {i: i in row.members for i in pool}
    # shadows are independent draws: all different, each overlapping another by about half
    shadow_members = [set(r.members) for r in splits.rows[1:]]
    assert len({frozenset(m) for m in shadow_members}) == 4
    overlaps = [len(shadow_members[i] & shadow_members[j]) for i in range(4) for j in range(i)]
    assert all(10 < o < 40 for o in overlaps), overlaps  # E = 25 for independent halves
    with pytest.raises(ValueError, match="model_index 5 not in splits"):
        splits.row(5)


def test_sizes_fraction_and_online_shadow_pool():
    splits = make_splits(ShapesSource(100), num_shadows=2, target_size=20, member_fraction=0.25)
    assert len(splits.target_pool) == len(splits.aux_pool) == 20
    assert len(splits.rows[0].members) == 5 and len(splits.rows[1].nonmembers) == 15
    online = make_splits(ShapesSource(100), 2, target_size=20, shadow_pool="auxiliary+queries")
    both = set(online.target_pool) | set(online.aux_pool)
    assert set(online.rows[1].queries) == both and set(online.rows[0].queries) < both
    with pytest.raises(ValueError, match="target_size 60 \\+ aux_size 50 > the 100"):
        make_splits(ShapesSource(100), target_size=60, aux_size=50)
    with pytest.raises(ValueError, match="num_shadows must be >= 0.*member_fraction"):
        make_splits(ShapesSource(100), num_shadows=-1, member_fraction=1.5)


def test_save_load_roundtrip_and_hand_edit_refused(tmp_path):
    src = ShapesSource(60)
    splits = make_splits(src, num_shadows=2)
    path = tmp_path / "splits.json"
    save_splits(splits, path)
    loaded = load_splits(path, src)
    assert loaded == splits and loaded.fingerprint == src.fingerprint()
    d = json.loads(path.read_text())
    moved = d["rows"][0]["members"].pop()
    d["rows"][0]["nonmembers"] = sorted(d["rows"][0]["nonmembers"] + [moved])
    path.write_text(json.dumps(d, indent=2))
    with pytest.raises(DataError, match="edited by hand"):
        load_splits(path)
    path.write_text("{not json")
    with pytest.raises(DataError, match="splits.json: malformed"):
        load_splits(path)


def test_changed_dataset_refused_with_what_changed(tmp_path):
    root = tmp_path / "data"
    write_folder(root, 20)
    path = tmp_path / "splits.json"
    save_splits(make_splits(ImageFolderSource(str(root)), num_shadows=1), path)
    # 3 rows added, 2 removed
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows = rows[2:] + write_folder(tmp_path / "extra", 3, start=100)
    for r in rows[-3:]:
        (tmp_path / "extra" / r["file_name"]).rename(root / r["file_name"])
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="3 sample ids added, 2 removed"):
        load_splits(path, ImageFolderSource(str(root)))
    # same ids, one caption changed
    save_splits(make_splits(ImageFolderSource(str(root)), num_shadows=1), path)
    rows[4]["text"] = "a different caption"
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="same 21 sample ids, but the captions changed"):
        load_splits(path, ImageFolderSource(str(root)))
    # a fingerprint string alone still refuses, without the detail
    with pytest.raises(DataError, match="different dataset"):
        load_splits(path, ImageFolderSource(str(root)).fingerprint())


def test_ensure_splits_creates_once_then_checks(tmp_path):
    layout = ExperimentLayout(tmp_path / "exp")
    first = ensure_splits(layout, ShapesSource(80), num_shadows=2, seed=5)
    stamp = layout.splits.stat().st_mtime_ns
    again = ensure_splits(str(tmp_path / "exp"), ShapesSource(80), num_shadows=2, seed=5)
    assert again.hash == first.hash and layout.splits.stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match=r"num_shadows=2 \(asked 3\), seed=5 \(asked 0\)"):
        ensure_splits(layout, ShapesSource(80), num_shadows=3)
    with pytest.raises(DataError, match="80 sample ids added"):
        ensure_splits(layout, ShapesSource(160), num_shadows=2, seed=5)
    with pytest.raises(DataError, match="captions and image bytes changed"):
        ensure_splits(layout, ShapesSource(80, seed=1), num_shadows=2, seed=5)


def test_shadow_size_draws_target_sized_shadows_from_a_large_pool():
    splits = make_splits(ShapesSource(400), 3, target_size=40, aux_size=360, shadow_size=40)
    assert len(splits.aux_pool) == 360  # the rest: autoencoder and encoder train on it
    aux = set(splits.aux_pool)
    for row in splits.rows[1:]:
        assert len(row.members) == len(row.nonmembers) == 20
        assert set(row.queries) <= aux
    assert len({tuple(r.queries) for r in splits.rows[1:]}) == 3  # independent draws
    again = make_splits(ShapesSource(400), 3, target_size=40, aux_size=360, shadow_size=40)
    assert again.hash == splits.hash
    with pytest.raises(ValueError, match="shadow_size must be in"):
        make_splits(ShapesSource(100), target_size=20, aux_size=20, shadow_size=30)


def test_the_first_splits_written_stay_when_stages_race(tmp_path):
    # two stages started side by side both find no splits.json and both make one: the second
    # write must not replace the first (its stage would train on rows not on disk)
    path = tmp_path / "exp" / "splits.json"
    first, other = make_splits(ShapesSource(80), seed=1), make_splits(ShapesSource(80), seed=2)
    save_splits(first, path, exclusive=True)
    written = path.read_bytes()
    with pytest.raises(FileExistsError):
        save_splits(other, path, exclusive=True)
    assert path.read_bytes() == written and [p.name for p in path.parent.iterdir()] == [path.name]
    with pytest.raises(DataError, match=r"seed=1 \(asked 2\)"):  # the loser checks the winner's
        ensure_splits(path.parent, ShapesSource(80), seed=2)
