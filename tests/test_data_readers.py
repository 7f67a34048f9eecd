"""Readers on fixtures written here: COCO (official + Karpathy), WebDataset shards, imagefolder;
every bad input gives one DataError naming the file; skip_bad_samples records the skips."""

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from lightning_mia.data import (
    CocoSource,
    DataError,
    ImageFolderSource,
    WebDatasetSource,
    build_source,
    make_splits,
)
from lightning_mia.data.webdataset import expand_braces, key_to_id

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]


@pytest.fixture(autouse=True)
def _digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MIA_CACHE", str(tmp_path / "cache"))


def image_bytes(colour, fmt="PNG", size=(24, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def centre(x):
    return tuple(((x[:, x.shape[1] // 2, x.shape[2] // 2] + 1) * 127.5).round().int().tolist())


def close(a, b, tol=10):
    return all(abs(p - q) <= tol for p, q in zip(a, b))


# ---------------------------------------------------------------- COCO
def write_coco(tmp_path, karpathy=False, n=3):
    img_dir = tmp_path / "coco"
    (img_dir / "val2014").mkdir(parents=True)
    ids = [9, 42, 1000][:n]
    for k, iid in enumerate(ids):
        sub = img_dir / "val2014" if karpathy else img_dir
        (sub / f"COCO_{iid:012d}.jpg").write_bytes(image_bytes(COLOURS[k], "JPEG"))
    caps = {iid: [f"caption {j} of image {iid}" for j in range(5)] for iid in ids}
    if karpathy:
        data = {
            "images": [
                {
                    "filepath": "val2014",
                    "filename": f"COCO_{iid:012d}.jpg",
                    "cocoid": iid,
                    "split": "train" if k else "test",
                    "sentences": [{"raw": c, "tokens": c.split()} for c in caps[iid]],
                }
                for k, iid in enumerate(ids)
            ],
            "dataset": "coco",
        }
    else:
        data = {
            "images": [{"id": iid, "file_name": f"COCO_{iid:012d}.jpg"} for iid in ids],
            "annotations": [
                {"id": 100 * iid + j, "image_id": iid, "caption": c}
                for iid in ids
                for j, c in enumerate(caps[iid])
            ],
        }
    ann = tmp_path / ("dataset_coco.json" if karpathy else "captions_val2014.json")
    ann.write_text(json.dumps(data))
    return ann, img_dir, data


@pytest.mark.parametrize("karpathy", [False, True])
def test_coco_reader(tmp_path, karpathy):
    ann, img_dir, _ = write_coco(tmp_path, karpathy)
    src = CocoSource(str(ann), str(img_dir), resolution=8)
    assert src.sample_ids() == [9, 42, 1000]
    for k, sid in enumerate(src.sample_ids()):
        assert src.caption(sid) in src.captions(sid) and len(src.captions(sid)) == 5
        assert f"of image {sid}" in src.caption(sid)
        x = src.image(sid)
        assert x.shape == (3, 8, 8) and close(centre(x), COLOURS[k])
    # the caption choice is a function of (caption_seed, id), recorded in the fingerprint
    again = CocoSource(str(ann), str(img_dir), resolution=8)
    assert [again.caption(i) for i in again.sample_ids()] == [src.caption(i) for i in [9, 42, 1000]]
    choices = {
        tuple(CocoSource(str(ann), str(img_dir), caption_seed=s).caption(i) for i in [9, 42])
        for s in range(6)
    }
    assert len(choices) > 1
    assert build_source(src.describe()).fingerprint() == src.fingerprint()


def test_coco_karpathy_subsets(tmp_path):
    ann, img_dir, _ = write_coco(tmp_path, karpathy=True)
    src = CocoSource(str(ann), str(img_dir), subsets=["train", "restval"])
    assert src.sample_ids() == [42, 1000]


# ---------------------------------------------------------------- WebDataset
def write_shard(path, samples):
    """samples: (key, {ext: bytes})."""
    with tarfile.open(path, "w") as tf:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def four_samples():
    return [
        (
            "000000001",
            {
                "jpg": image_bytes(COLOURS[0], "JPEG"),
                "txt": b"a red square\n",
                "json": b'{"key": "000000001", "caption": "ignored"}',
            },
        ),
        ("000000002", {"png": image_bytes(COLOURS[1]), "txt": b"a green square"}),
        (
            "000000003",
            {
                "webp": image_bytes(COLOURS[2], "WEBP", (16, 24)),
                "json": b'{"key": "000000003", "caption": "a blue square"}',
            },
        ),
        ("sample_x", {"png": image_bytes(COLOURS[3]), "txt": "a yellow square \u00e9".encode()}),
    ]


def test_webdataset_reader(tmp_path):
    write_shard(tmp_path / "00000.tar", four_samples())
    src = WebDatasetSource(str(tmp_path / "00000.tar"), resolution=8)
    hashed = key_to_id("sample_x")
    assert src.sample_ids() == sorted([1, 2, 3, hashed]) and 0 <= hashed < 2**63
    assert src.caption(1) == "a red square"  # .txt wins over .json
    assert src.caption(3) == "a blue square"
    assert src.caption(hashed) == "a yellow square \u00e9"
    for sid, colour in zip([1, 2, 3, hashed], COLOURS):
        assert close(centre(src.image(sid)), colour)
    # folder, glob and brace forms find the same shards
    write_shard(
        tmp_path / "00001.tar", [("000000010", {"png": image_bytes(COLOURS[4]), "txt": b"c"})]
    )
    for spec in [tmp_path, tmp_path / "*.tar", tmp_path / "{00000..00001}.tar"]:
        assert len(WebDatasetSource(str(spec))) == 5
    assert expand_braces("a{0..2}b{x,y}") == ["a0bx", "a0by", "a1bx", "a1by", "a2bx", "a2by"]
    assert expand_braces("{008..010}") == ["008", "009", "010"]


def test_webdataset_id_collision_is_an_error(tmp_path):
    write_shard(tmp_path / "00000.tar", four_samples())
    write_shard(tmp_path / "00001.tar", four_samples()[:1])
    with pytest.raises(DataError, match=r"collides.*00000\.tar"):
        WebDatasetSource(str(tmp_path))


# ---------------------------------------------------------------- imagefolder
def write_folder(tmp_path, rows, fmt="jsonl", name="folder"):
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    for k, row in enumerate(rows):
        if "file_name" in row and not (root / row["file_name"]).exists():
            (root / row["file_name"]).write_bytes(image_bytes(COLOURS[k % 5]))
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        cols = list(rows[0])
        lines = [",".join(cols)] + [",".join(str(r[c]) for c in cols) for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_imagefolder_reader(tmp_path, fmt):
    rows = [{"file_name": f"{k}.png", "text": f"caption {k}"} for k in range(3)]
    src = ImageFolderSource(str(write_folder(tmp_path, rows, fmt)), resolution=4)
    assert src.sample_ids() == [0, 1, 2]
    assert [src.caption(i) for i in range(3)] == ["caption 0", "caption 1", "caption 2"]
    assert close(centre(src.image(2)), COLOURS[2])
    rows = [{"id": 7 + 10 * k, "file_name": f"{k}.png", "prompt": f"p {k}"} for k in range(3)]
    src = ImageFolderSource(str(write_folder(tmp_path, rows, fmt, "ids")), caption_column="prompt")
    assert src.sample_ids() == [7, 17, 27] and src.caption(17) == "p 1"


def test_fingerprint_follows_file_bytes(tmp_path):
    rows = [{"file_name": f"{k}.png", "text": f"caption {k}"} for k in range(3)]
    root = write_folder(tmp_path, rows)
    before = ImageFolderSource(str(root)).dataset_fingerprint()
    assert ImageFolderSource(str(root)).fingerprint() == before.digest  # cached digests agree
    (root / "1.png").write_bytes(image_bytes((1, 2, 3)))
    after = ImageFolderSource(str(root)).dataset_fingerprint()
    assert before.describe_change(after) == "same 3 sample ids, but the image bytes changed"


# ---------------------------------------------------------------- bad input
def _bad_coco(tmp_path, case):
    ann, img_dir, data = write_coco(tmp_path)
    if case == "missing annotations":
        return (lambda: CocoSource(str(tmp_path / "nope.json"), str(img_dir))), "nope.json"
    if case == "malformed json":
        ann.write_text('{"images": [')
        return (lambda: CocoSource(str(ann), str(img_dir))), ann.name
    if case == "missing image folder":
        return (lambda: CocoSource(str(ann), str(tmp_path / "nodir"))), "nodir"
    if case == "image absent":
        (img_dir / "COCO_000000000042.jpg").unlink()
    if case == "zero-byte image":
        (img_dir / "COCO_000000000042.jpg").write_bytes(b"")
    if case in ("empty caption", "non-text caption"):
        data["annotations"][7]["caption"] = "  " if case == "empty caption" else 12
        ann.write_text(json.dumps(data))
        return (lambda: CocoSource(str(ann), str(img_dir))), ann.name
    if case == "truncated image":
        p = img_dir / "COCO_000000000042.jpg"
        p.write_bytes(p.read_bytes()[:200])
        return (lambda: CocoSource(str(ann), str(img_dir)).image(42)), p.name
    if case == "not an image":
        (img_dir / "COCO_000000000042.jpg").write_text("hello")
        return (lambda: CocoSource(str(ann), str(img_dir)).image(42)), "COCO_000000000042.jpg"
    return (lambda: CocoSource(str(ann), str(img_dir))), "COCO_000000000042.jpg"


def _bad_folder(tmp_path, case):
    rows = [{"file_name": f"{k}.png", "text": f"caption {k}"} for k in range(3)]
    root = write_folder(tmp_path, rows, "csv" if "csv" in case else "jsonl")
    build = lambda: ImageFolderSource(str(root))  # noqa: E731
    if case == "malformed jsonl":
        (root / "metadata.jsonl").write_text(
            '{"file_name": "0.png", "text": "a"}\n{"file_name": \n'
        )
        return build, "metadata.jsonl line 2"
    if case == "malformed csv":
        (root / "metadata.csv").write_text('file_name,text\n0.png,"a",extra\n')
        return build, "metadata.csv line 2"
    if case == "csv missing column":
        (root / "metadata.csv").write_text("file_name,caption\n0.png,a\n")
        return build, "metadata.csv line 2: no 'text' column"
    if case == "non-text caption jsonl":
        (root / "metadata.jsonl").write_text('{"file_name": "0.png", "text": null}\n')
        return build, "metadata.jsonl line 1"
    if case == "empty metadata":
        (root / "metadata.jsonl").write_text("\n")
        return build, "metadata.jsonl: lists no images"
    if case == "no metadata":
        (root / "metadata.jsonl").unlink()
        return build, str(root)
    return (lambda: ImageFolderSource(str(tmp_path / "absent"))), "absent"


def _bad_shard(tmp_path, case):
    path = tmp_path / "00000.tar"
    build = lambda: WebDatasetSource(str(path))  # noqa: E731
    if case == "not a tar":
        path.write_bytes(b"\x00garbage" * 100)
        return build, "00000.tar"
    if case == "no shards":
        return (lambda: WebDatasetSource(str(tmp_path / "{00000..00003}.tar"))), "00000.tar"
    samples = four_samples()
    if case in ("truncated tar", "tar cut between members"):
        write_shard(path, samples)
        with tarfile.open(path) as tf:
            third = tf.getmembers()[2]
        cut = third.offset if case == "tar cut between members" else third.offset_data + 5
        path.write_bytes(path.read_bytes()[:cut])
        return build, "00000.tar: truncated"
    if case == "missing caption":
        samples[1][1].pop("txt")
    if case == "malformed json member":
        samples[2][1]["json"] = b'{"caption": '
    if case == "missing image":
        samples[1][1].pop("png")
    write_shard(path, samples)
    return build, "00000.tar"


BAD = {
    "coco": [
        "missing annotations",
        "malformed json",
        "missing image folder",
        "image absent",
        "zero-byte image",
        "empty caption",
        "non-text caption",
        "truncated image",
        "not an image",
    ],
    "folder": [
        "malformed jsonl",
        "malformed csv",
        "csv missing column",
        "non-text caption jsonl",
        "empty metadata",
        "no metadata",
        "missing folder",
    ],
    "shard": [
        "not a tar",
        "no shards",
        "truncated tar",
        "tar cut between members",
        "missing caption",
        "malformed json member",
        "missing image",
    ],
}


@pytest.mark.parametrize(("kind", "case"), [(k, c) for k, cases in BAD.items() for c in cases])
def test_bad_input_names_the_file(tmp_path, kind, case):
    make = {"coco": _bad_coco, "folder": _bad_folder, "shard": _bad_shard}[kind]
    call, name = make(tmp_path, case)
    with pytest.raises(DataError) as info:
        call()
    assert name in str(info.value), str(info.value)


def test_skip_bad_samples_records_them_in_the_splits(tmp_path):
    rows = [{"file_name": f"{k}.png", "text": f"caption {k}"} for k in range(10)]
    rows[3]["text"] = ""
    root = write_folder(tmp_path, rows)
    (root / "5.png").unlink()
    noise = torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy()
    Image.fromarray(noise).save(root / "7.png")
    data = (root / "7.png").read_bytes()
    (root / "7.png").write_bytes(data[: len(data) // 2])  # truncated: found on decode only
    with pytest.raises(DataError, match="line 4"):
        ImageFolderSource(str(root))
    src = ImageFolderSource(str(root), skip_bad_samples=True)
    assert set(src.bad_samples) == {3, 5}  # the cheap checks, at construction
    splits = make_splits(src, num_shadows=1, target_size=4, aux_size=3)
    assert set(splits.skipped) == {3, 5, 7}
    assert "caption is empty" in splits.skipped[3] and "5.png" in splits.skipped[5]
    assert "7.png" in splits.skipped[7] and "truncated" in splits.skipped[7]
    used = set(splits.target_pool) | set(splits.aux_pool)
    assert used == {0, 1, 2, 4, 6, 8, 9}
    assert splits.to_dict()["skipped"][0] == {"sample_id": 3, "reason": splits.skipped[3]}


def test_images_are_float_tensors(tmp_path):
    rows = [{"file_name": "0.png", "text": "x"}]
    src = ImageFolderSource(str(write_folder(tmp_path, rows)), resolution=6)
    x = src.image(0)
    assert x.dtype == torch.float32 and x.shape == (3, 6, 6)
