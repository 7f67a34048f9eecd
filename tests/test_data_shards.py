"""WebDataset shards: a truncated or corrupt tar is refused naming the shard and the byte where
reading stopped, or skipped whole with skip_bad_samples (recorded in splits.json); the index is
built once, kept on disk, memory-mapped, read by id, and the fingerprint is the one of before."""

import hashlib
import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from lightning_mia.data import DataError, WebDatasetSource, ensure_splits
from lightning_mia.data.wds_index import open_index
from lightning_mia.data.webdataset import key_to_id
from lightning_mia.paths import ExperimentLayout


def png(k):
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (k % 256, (7 * k) % 256, (13 * k) % 256)).save(buf, format="PNG")
    return buf.getvalue()


def samples(start, n):
    keys = range(start, start + n)
    return [(f"{k:09d}", {"png": png(k), "txt": f"caption {k}".encode()}) for k in keys]


def write_shard(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, files in items:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def member_offsets(path):
    with tarfile.open(path) as tf:
        return [(m.offset, m.offset_data, m.size) for m in tf.getmembers()]


def damage(path, case):
    """Damage the 3rd member of a shard; returns the byte where reading must stop."""
    data = path.read_bytes()
    header, start, _ = member_offsets(path)[2]
    if case == "cut inside a member":
        path.write_bytes(data[: start + 3])
    elif case == "cut between members":
        path.write_bytes(data[:header])
    elif case == "garbage header":
        path.write_bytes(data[:header] + b"\xa5" * 512 + data[header + 512 :])
    elif case == "data after the end":
        with tarfile.open(path) as tf:
            tf.getmembers()
            end = tf.offset  # where the end-of-archive blocks start
        path.write_bytes(data + b"more bytes after the end")
        return end
    return header


CASES = ["cut inside a member", "cut between members", "garbage header", "data after the end"]


@pytest.mark.parametrize("case", CASES)
def test_broken_shard_names_it_and_the_byte_where_reading_stopped(tmp_path, case):
    path = tmp_path / "shards" / "00001.tar"
    write_shard(path, samples(0, 4))
    stop = damage(path, case)
    with pytest.raises(DataError) as info:
        WebDatasetSource(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert f"reading stopped at byte {stop}" in message, message
    word = "truncated" if case.startswith("cut") else "corrupt"
    assert word in message


def test_skip_bad_samples_skips_broken_and_unreadable_shards_whole(tmp_path):
    root = tmp_path / "shards"
    write_shard(root / "00000.tar", samples(0, 6))
    write_shard(root / "00001.tar", samples(100, 4))
    stop = damage(root / "00001.tar", "cut inside a member")
    (root / "00002.tar").mkdir()  # matched by the glob, cannot be read as a file
    with pytest.raises(DataError, match="00001.tar: truncated"):
        WebDatasetSource(str(root))
    src = WebDatasetSource(str(root), skip_bad_samples=True)
    assert src.sample_ids() == list(range(6))
    assert set(src.skipped_files) == {str(root / "00001.tar"), str(root / "00002.tar")}
    layout = ExperimentLayout(tmp_path / "exp")
    splits = ensure_splits(layout, src, num_shadows=1)
    stored = json.loads(layout.splits.read_text())["skipped_files"]
    assert [s["file"] for s in stored] == [str(root / "00001.tar"), str(root / "00002.tar")]
    assert f"reading stopped at byte {stop}" in stored[0]["reason"]
    assert "cannot be read" in stored[1]["reason"]
    assert set(splits.target_pool) | set(splits.aux_pool) == set(range(6))
    # repaired later: the dataset changed, so the old splits are refused
    write_shard(root / "00001.tar", samples(100, 4))
    (root / "00002.tar").rmdir()
    with pytest.raises(DataError, match="4 sample ids added"):
        ensure_splits(layout, WebDatasetSource(str(root), skip_bad_samples=True), num_shadows=1)


def old_fingerprint_parts(paths):
    """The image hash as the hand-written tarfile reader computed it (an independent reference)."""
    shard_digest, members = [], {}
    for k, path in enumerate(paths):
        h = hashlib.sha256()
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".png"):
                    h.update(f"{m.name[:-4]}\t{m.size}\n".encode() + tf.extractfile(m).read())
                    members[key_to_id(m.name[:-4])] = (k, m.name)
        shard_digest.append(h.hexdigest())
    h = hashlib.sha256()
    for sid in sorted(members):
        k, name = members[sid]
        h.update(f"{sid}\t{name}\t{shard_digest[k]}\n".encode())
    return h.hexdigest()


def test_index_is_built_once_mapped_and_read_by_id(tmp_path):
    root = tmp_path / "shards"
    for s in range(3):
        write_shard(root / f"{s:05d}.tar", samples(50 * s, 40))
    src = WebDatasetSource(str(root), resolution=4)
    index = src.index
    assert index.folder is not None and (index.folder / "meta.json").is_file()
    assert isinstance(index.rows, np.memmap) and isinstance(index.ids, np.memmap)
    built = (index.folder / "rows.npy").stat().st_mtime_ns
    again = WebDatasetSource(str(root), resolution=4)
    assert again.index.folder == index.folder
    assert (index.folder / "rows.npy").stat().st_mtime_ns == built  # mapped, not rebuilt
    # random access by id, in any order
    for sid in [137, 3, 88, 51, 0, 139]:
        assert src.caption(sid) == f"caption {sid}"
        assert src.image_bytes(sid) == png(sid)
    with pytest.raises(KeyError, match="sample id 45"):
        src.caption(45)
    # a DataLoader worker started by spawn receives the folder, not a copy of the arrays
    assert len(pickle.dumps(src)) < 4096
    clone = pickle.loads(pickle.dumps(src))
    assert clone.caption(120) == "caption 120" and isinstance(clone.index.rows, np.memmap)
    # splits made before the index keep matching: the fingerprint did not change
    assert src.images_sha256() == old_fingerprint_parts(src.shards)
    # a rewritten shard gets a new index
    write_shard(root / "00001.tar", samples(50, 41))
    assert WebDatasetSource(str(root)).index.folder != index.folder


def test_parallel_scan_gives_the_same_index(tmp_path, monkeypatch):
    root = tmp_path / "shards"
    paths = []
    for s in range(4):
        paths.append(root / f"{s:05d}.tar")
        write_shard(paths[-1], samples(1000 - 30 * s, 25))  # later shards hold lower ids
    monkeypatch.setenv("LIGHTNING_MIA_CACHE", str(tmp_path / "one"))
    one = open_index(paths, num_workers=1)
    monkeypatch.setenv("LIGHTNING_MIA_CACHE", str(tmp_path / "two"))
    two = open_index(paths, num_workers=2)
    assert one.folder != two.folder and one.meta == two.meta
    for name in ("ids", "rows", "digests", "captions", "keys"):
        assert np.array_equal(getattr(one, name), getattr(two, name)), name
    assert np.all(np.diff(one.ids) > 0) and len(one) == 100


def test_unwritable_cache_builds_in_memory(tmp_path, monkeypatch):
    write_shard(tmp_path / "00000.tar", samples(0, 5))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("LIGHTNING_MIA_CACHE", str(blocker))
    src = WebDatasetSource(str(tmp_path / "00000.tar"))
    assert src.index.folder is None and src.caption(4) == "caption 4"
    assert pickle.loads(pickle.dumps(src)).caption(2) == "caption 2"
