"""Registering a dataset checks every sample: an image that is text, or cut short, is refused in
every format with one line and no splits.json, or left out and recorded with skip_bad_samples;
checks are cached by file content; split sizes the data cannot hold are one-line DataErrors."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from lightning_mia.data import (
    CocoSource,
    DataError,
    ImageFolderSource,
    ShapesSource,
    WebDatasetSource,
    ensure_splits,
    make_splits,
)
from lightning_mia.data.checks import CheckCache
from lightning_mia.data.sources import file_digests
from lightning_mia.errors import UserError
from lightning_mia.paths import ExperimentLayout
from lightning_mia.terminal import run_cli

N = 8
BAD_INDEX = 3


def png(k, size=(12, 10)):
    buf = io.BytesIO()
    noise = np.random.default_rng(k).integers(0, 255, (size[1], size[0], 3), np.uint8)
    Image.fromarray(noise).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(k):
    buf = io.BytesIO()
    Image.open(io.BytesIO(png(k, (64, 64)))).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


BROKEN = {
    "text named .jpg": b"this is a caption file, not a JPEG\n",
    "truncated png": png(99)[: len(png(99)) // 2],
    "truncated jpeg": jpeg(99)[: len(jpeg(99)) - 200],
    "png with a flipped bit": png(99)[:60] + bytes([png(99)[60] ^ 0x10]) + png(99)[61:],
}


def write_coco(root, images):
    (root / "img").mkdir(parents=True)
    for k, data in enumerate(images):
        (root / "img" / f"COCO_{k + 1:012d}.jpg").write_bytes(data)
    ann = {
        "images": [{"id": k + 1, "file_name": f"COCO_{k + 1:012d}.jpg"} for k in range(N)],
        "annotations": [
            {"id": k, "image_id": k + 1, "caption": f"photo {k}"} for k in range(len(images))
        ],
    }
    (root / "captions.json").write_text(json.dumps(ann))

    def build(skip):
        return CocoSource(str(root / "captions.json"), str(root / "img"), 8, skip_bad_samples=skip)

    return build, f"COCO_{BAD_INDEX + 1:012d}.jpg", BAD_INDEX + 1


def write_folder(root, images, fmt):
    root.mkdir(parents=True)
    rows = []
    for k, data in enumerate(images):
        (root / f"{k}.jpg").write_bytes(data)
        rows.append({"file_name": f"{k}.jpg", "text": f"photo {k}"})
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        lines = ["file_name,text"] + [f"{r['file_name']},{r['text']}" for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")

    def build(skip):
        return ImageFolderSource(str(root), resolution=8, skip_bad_samples=skip)

    return build, f"{BAD_INDEX}.jpg", BAD_INDEX


def write_shard(path, samples):
    """samples: (key, {ext: bytes})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def write_wds(root, images):
    samples = [(f"{k:09d}", {"jpg": d, "txt": f"photo {k}".encode()}) for k, d in enumerate(images)]
    write_shard(root / "00000.tar", samples)

    def build(skip):
        return WebDatasetSource(str(root), resolution=8, skip_bad_samples=skip)

    return build, f"00000.tar:{BAD_INDEX:09d}.jpg", BAD_INDEX


FORMATS = {
    "coco": write_coco,
    "imagefolder-jsonl": lambda root, images: write_folder(root, images, "jsonl"),
    "imagefolder-csv": lambda root, images: write_folder(root, images, "csv"),
    "webdataset": write_wds,
}


def dataset(tmp_path, fmt, broken):
    images = [jpeg(k) if k % 2 else png(k) for k in range(N)]
    images[BAD_INDEX] = BROKEN[broken]
    return FORMATS[fmt](tmp_path / "data", images)


@pytest.mark.parametrize("broken", sorted(BROKEN))
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_broken_image_refused_in_one_line_without_splits(tmp_path, capsys, fmt, broken):
    build, name, _ = dataset(tmp_path, fmt, broken)
    source = build(False)  # Image.open-level checks pass: the file is only caught by decoding
    layout = ExperimentLayout(tmp_path / "exp")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: ensure_splits(layout, source, num_shadows=1))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err, err
    assert "truncated or corrupt" in err or "not an image file" in err
    assert not layout.splits.exists() and not list(layout.root.glob("*"))


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_skip_bad_samples_leaves_them_out_before_the_draw(tmp_path, fmt):
    build, name, bad_id = dataset(tmp_path, fmt, "truncated png")
    layout = ExperimentLayout(tmp_path / "exp")
    splits = ensure_splits(layout, build(True), num_shadows=2)
    assert set(splits.skipped) == {bad_id} and name in splits.skipped[bad_id]
    pools = set(splits.target_pool) | set(splits.aux_pool)
    assert bad_id not in pools and len(pools) == N - 1  # default sizes split the 7 usable
    assert all(bad_id not in r.queries for r in splits.rows)
    stored = json.loads(layout.splits.read_text())
    assert stored["skipped"] == [{"sample_id": bad_id, "reason": splits.skipped[bad_id]}]
    # a later stage (new process, same data) reloads the record instead of checking again
    again = build(True)
    assert ensure_splits(layout, again, num_shadows=2).hash == splits.hash
    assert bad_id in again.bad_samples


def test_checks_are_cached_by_file_content(tmp_path):
    images = [png(k) for k in range(6)] + [png(0)]  # 6.jpg: the same bytes as 0.jpg
    build, _, _ = write_folder(tmp_path / "data", images, "jsonl")
    assert make_splits(build(False), num_shadows=1).skipped == {}
    cache = CheckCache("image-file")
    digests = file_digests([tmp_path / "data" / f"{k}.jpg" for k in range(7)])
    assert set(cache.results) == set(digests) and len(cache.results) == 6  # one per content
    assert all(v == "" for v in cache.results.values())
    lines = cache.path.read_text().splitlines()
    assert len(lines) == 6
    # the same content under another path: found in the cache by digest, not decoded again
    # (shown by a result planted for 2.jpg's content, which a decode would contradict)
    shutil.copytree(tmp_path / "data", tmp_path / "copy")
    cache.add([(digests[2], "planted result")])
    moved = ImageFolderSource(str(tmp_path / "copy"), resolution=8, skip_bad_samples=True)
    moved.verify()
    assert moved.bad_samples == {2: f"image {tmp_path / 'copy' / '2.jpg'} (id 2): planted result"}
    # a torn last line (a run killed mid-write) is ignored
    with open(cache.path, "a") as f:
        f.write('["abc", "tor')
    assert len(CheckCache("image-file").results) == 6


@pytest.mark.parametrize(
    ("caption", "problem"),
    [("\ud800 lone", "lone surrogate"), ("\u0000\u200b", "no printable"), ("  \t", "empty")],
)
def test_unusable_captions(tmp_path, caption, problem):
    root = tmp_path / "data"
    build, _, _ = write_folder(root, [png(k) for k in range(4)], "jsonl")
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    rows[2]["text"] = caption
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=f"metadata.jsonl line 3.*{problem}"):
        build(False)
    src = build(True)
    assert problem in make_splits(src, num_shadows=0, target_size=2).skipped[2]


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"target_size": 60, "aux_size": 50}, "target_size 60 + aux_size 50 > the 100 usable"),
        ({"target_size": 40, "aux_size": 40, "public_size": 30}, "+ public_size 30 > the 100"),
        ({"target_size": 10, "member_fraction": 0.01}, "leaves 0 members and 10 non-members"),
        ({"public_size": 0}, "public_size must be >= 1"),
        ({"duplicates": "merge"}, "duplicates must be one of"),
        (
            {"target_size": 1, "num_shadows": -1},
            "num_shadows must be >= 0|target_size must be >= 2",
        ),
    ],
)
def test_sizes_the_data_cannot_hold_are_one_line(tmp_path, capsys, sizes, message):
    with pytest.raises(DataError) as info:
        make_splits(ShapesSource(100), **sizes)
    assert all(part in str(info.value) for part in message.split("|")), str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    layout = ExperimentLayout(tmp_path / "exp")
    with pytest.raises(SystemExit):
        run_cli(lambda: ensure_splits(layout, ShapesSource(100), **sizes))
    assert capsys.readouterr().err.startswith("error: cannot make splits of ShapesSource(")
    assert not layout.splits.exists()
