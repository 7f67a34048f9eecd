"""Duplicate images (same bytes, often the same caption) are found when splits are made, counted
and shown in the log and in splits.json, and with duplicates: drop only one of each is kept before
the draw, so no copy of a member can sit among the non-members."""

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from lightning_mia.data import (
    ImageFolderSource,
    ShapesSource,
    WebDatasetSource,
    ensure_splits,
    make_splits,
)
from lightning_mia.data.duplicates import find_duplicates
from lightning_mia.paths import ExperimentLayout

N = 40
# (copy, original): 5 copies of 0 with its caption, 3 of 1 with other captions, 1 of 2
COPIES = {k: 0 for k in (10, 11, 12, 13, 14)} | {20: 1, 21: 1, 22: 1} | {30: 2}


def png(k):
    buf = io.BytesIO()
    noise = np.random.default_rng(k).integers(0, 255, (6, 6, 3), np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    return buf.getvalue()


def caption(k):
    return f"caption {COPIES.get(k, k)}" if COPIES.get(k) == 0 else f"caption {k}"


def image(k):
    return png(COPIES.get(k, k))


def folder(tmp_path):
    root = tmp_path / "folder"
    root.mkdir()
    for k in range(N):
        (root / f"{k}.png").write_bytes(image(k))
    rows = [{"file_name": f"{k}.png", "text": caption(k)} for k in range(N)]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ImageFolderSource(str(root), resolution=4)


def shards(tmp_path):
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(2):  # copies cross shards: ids 0..19 in one, 20..39 in the other
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for k in range(20 * s, 20 * s + 20):
                for ext, data in (("png", image(k)), ("txt", caption(k).encode())):
                    info = tarfile.TarInfo(f"{k:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return WebDatasetSource(str(root), resolution=4)


SOURCES = {"imagefolder": folder, "webdataset": shards}
GROUPS = [[0, 10, 11, 12, 13, 14], [1, 20, 21, 22], [2, 30]]


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_duplicates_reported_in_log_and_splits(tmp_path, kind):
    source = SOURCES[kind](tmp_path)
    assert find_duplicates(source, source.sample_ids()) == GROUPS
    layout = ExperimentLayout(tmp_path / "exp")
    with pytest.warns(UserWarning, match="3 groups of identical images") as warned:
        splits = ensure_splits(layout, source, num_shadows=2, seed=3)
    record = json.loads(layout.splits.read_text())["duplicates"]
    assert record == splits.duplicates
    assert record["groups"] == 3 and record["samples"] == 12 and record["policy"] == "report"
    assert record["same_caption_groups"] == 1  # only the copies of 0 repeat its caption
    assert [e["sample_ids"] for e in record["examples"]] == [g[:5] for g in GROUPS]
    assert [e["same_caption"] for e in record["examples"]] == [True, False, False]
    # the leak left in place, row by row: groups with ids among both members and non-members
    for k, row in enumerate(splits.rows):
        members, nonmembers = set(row.members), set(row.nonmembers)
        expected = sum(1 for g in GROUPS if members & set(g) and nonmembers & set(g))
        assert record["across_membership"][k] == expected
    assert sum(record["across_membership"]) > 0  # with this seed some copies straddle
    logged = " ".join(str(w.message) for w in warned)
    assert "(12 samples, 1 groups with the same caption too)" in logged
    assert "e.g. [0, 10, 11, 12, 13]" in logged and "duplicates: drop" in logged


@pytest.mark.parametrize("kind", sorted(SOURCES))
def test_drop_keeps_one_of_each_before_the_draw(tmp_path, kind):
    source = SOURCES[kind](tmp_path)
    splits = make_splits(source, num_shadows=2, seed=3, duplicates="drop")
    dropped = [i for g in GROUPS for i in g[1:]]
    assert splits.duplicates["dropped"] == sorted(dropped)
    pools = set(splits.target_pool) | set(splits.aux_pool)
    assert pools == set(range(N)) - set(dropped) and {0, 1, 2} <= pools
    assert splits.duplicates["across_membership"] == [0, 0, 0]
    assert splits.config["duplicates"] == "drop"
    digests = source.image_digests(sorted(pools))
    assert len(set(digests.tolist())) == len(pools)  # no two images alike are left


def test_no_duplicates_leaves_splits_json_as_before(tmp_path):
    splits = make_splits(ShapesSource(300), num_shadows=2)
    assert splits.duplicates is None
    body = splits.to_dict()
    assert set(body) == {
        "format",
        "seed",
        "config",
        "dataset",
        "target_pool",
        "aux_pool",
        "rows",
        "skipped",
        "hash",
    }
    assert "duplicates" not in body["config"] and "public_size" not in body["config"]
    assert find_duplicates(ShapesSource(300), range(300)) == []
