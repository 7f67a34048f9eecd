"""Collections as their owners keep them: Hugging Face `datasets` folders and parquet files, as
a source of every stage, as member/suspect/reference lists, and their per-sample metadata.
Every set here is written by `datasets` itself."""

import io

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

datasets = pytest.importorskip("datasets")

from lightning_mia.data.hf_datasets import HFDatasetSource  # noqa: E402
from lightning_mia.data.imagefolder import ImageFolderSource  # noqa: E402
from lightning_mia.data.images import decode_image  # noqa: E402
from lightning_mia.data.member_lists import MemberListSource  # noqa: E402
from lightning_mia.data.sources import SOURCES, DataError, build_source  # noqa: E402


def png(seed: int, size=(20, 14)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def dataset(n=6, start=0, users=("ann", "bob", "cy"), image_bytes=None):
    feats = datasets.Features(
        {
            "image": datasets.Image(),
            "text": datasets.Value("string"),
            "artist": datasets.Value("string"),
            "sid": datasets.Value("int64"),
        }
    )
    images = image_bytes or [png(start + i) for i in range(n)]
    return datasets.Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": None} for b in images],
            "text": [f"a drawing number {start + i}" for i in range(n)],
            "artist": [users[i % len(users)] for i in range(n)],
            "sid": [100 + start + i for i in range(n)],
        },
        features=feats,
    )


@pytest.fixture(autouse=True)
def _quiet_datasets():
    datasets.disable_progress_bars()


def test_a_save_to_disk_folder_is_a_source_for_every_stage(tmp_path):
    ds = dataset()
    ds.save_to_disk(str(tmp_path / "pokemon"))
    src = SOURCES["hf-datasets"](str(tmp_path / "pokemon"), id_column="sid", resolution=8)
    assert isinstance(src, HFDatasetSource)
    assert src.sample_ids() == list(range(100, 106))
    assert src.caption(102) == "a drawing number 2"
    expected = decode_image(png(2), 8, "x")
    torch.testing.assert_close(src.image(102), expected)
    assert src.image(102, resolution=4).shape == (3, 4, 4)
    assert src.verify() == {}
    again = build_source(src.describe())  # what splits.json records rebuilds it
    assert again.fingerprint() == src.fingerprint() and again.sample_ids() == src.sample_ids()
    assert src.image_digests([100, 101]).dtype == np.dtype("S16")


def test_parquet_files_and_splits_read_the_same_samples(tmp_path):
    ds = dataset()
    ds.save_to_disk(str(tmp_path / "disk"))
    (tmp_path / "hub" / "data").mkdir(parents=True)
    ds.select(range(3)).to_parquet(str(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(3, 6)).to_parquet(
        str(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet")
    )
    dataset(2, 50).to_parquet(str(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet"))
    disk = HFDatasetSource(str(tmp_path / "disk"), id_column="sid", resolution=8)
    hub = HFDatasetSource(str(tmp_path / "hub"), id_column="sid", split="train", resolution=8)
    assert hub.fingerprint() == disk.fingerprint()
    one = HFDatasetSource(str(tmp_path / "hub/data/test-00000-of-00001.parquet"), resolution=8)
    assert one.sample_ids() == [0, 1] and one.caption(1) == "a drawing number 51"


def test_a_dataset_dict_needs_a_split(tmp_path):
    datasets.DatasetDict({"train": dataset(), "test": dataset(2, 50)}).save_to_disk(str(tmp_path))
    with pytest.raises(DataError, match=r"splits \['train', 'test'\]; choose one with split"):
        HFDatasetSource(str(tmp_path))
    assert len(HFDatasetSource(str(tmp_path), split="test")) == 2
    with pytest.raises(DataError, match="no split 'val'"):
        HFDatasetSource(str(tmp_path), split="val")


def test_configurable_columns_and_raw_bytes(tmp_path):
    # LAION-style: a binary `jpg` column and a `caption` column, no Image feature
    ds = datasets.Dataset.from_dict({"jpg": [png(1), png(2)], "caption": ["one", "two"]})
    ds.to_parquet(str(tmp_path / "laion.parquet"))
    src = HFDatasetSource(
        str(tmp_path / "laion.parquet"), image_column="jpg", caption_column="caption", resolution=8
    )
    torch.testing.assert_close(src.image(1), decode_image(png(2), 8, "x"))
    with pytest.raises(
        DataError, match=r"no image column 'image' \(columns: \['jpg', 'caption'\]\)"
    ):
        HFDatasetSource(str(tmp_path / "laion.parquet"), caption_column="caption")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "no such file or folder"),
        (lambda p: p.mkdir(), "no parquet files"),
        (lambda p: p.write_text("x"), "expected a save_to_disk folder or .parquet files"),
    ],
)
def test_bad_paths_are_one_clear_error(tmp_path, make, message):
    path = tmp_path / "data.json"
    make(path)
    with pytest.raises(DataError, match=message):
        HFDatasetSource(str(path))


def test_bad_images_and_ids_are_named(tmp_path):
    images = [png(0), b"not an image", png(2)]
    dataset(3, image_bytes=images).save_to_disk(str(tmp_path / "bad"))
    src = HFDatasetSource(str(tmp_path / "bad"), resolution=8)
    with pytest.raises(DataError, match=r"bad row 1 \(id 1\)"):
        src.verify()
    skipping = HFDatasetSource(str(tmp_path / "bad"), resolution=8, skip_bad_samples=True)
    assert list(skipping.verify()) == [1] and skipping.valid_ids() == [0, 2]
    dup = dataset(3).map(lambda row: {"sid": 7})
    dup.save_to_disk(str(tmp_path / "dup"))
    with pytest.raises(DataError, match="sample id 7 appears twice in sid"):
        HFDatasetSource(str(tmp_path / "dup"), id_column="sid")


def test_metadata_columns_for_group_by(tmp_path):
    dataset().save_to_disk(str(tmp_path / "d"))
    src = HFDatasetSource(str(tmp_path / "d"), id_column="sid", resolution=8)
    assert "artist" in src.columns() and "image" not in src.columns()
    assert src.column_values("artist", [100, 104]) == ["ann", "bob"]
    with pytest.raises(
        DataError, match=r"no per-sample column 'user' \(columns: text, artist, sid\)"
    ):
        src.column_values("user", [100])


def test_an_image_folder_gives_its_metadata_columns(tmp_path):
    (tmp_path / "a.png").write_bytes(png(0))
    (tmp_path / "b.png").write_bytes(png(1))
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "a.png", "text": "a", "user": "u1"}\n{"file_name": "b.png", "text": "b"}\n'
    )
    src = ImageFolderSource(str(tmp_path), resolution=8)
    assert src.columns() == ["user"]
    assert src.column_values("user", [0]) == ["u1"]
    with pytest.raises(
        DataError, match=r"column 'user' has no value for 1 samples, e.g. ids \[1\]"
    ):
        src.column_values("user", [0, 1])


def test_member_lists_kept_as_datasets(tmp_path):
    dataset(4, 0, users=("ann", "bob")).save_to_disk(str(tmp_path / "suspect"))
    dataset(3, 10, users=("cy",)).to_parquet(str(tmp_path / "reference.parquet"))
    src = MemberListSource(
        str(tmp_path / "suspect"), str(tmp_path / "reference.parquet"), resolution=8
    )
    assert src.members == [0, 1, 2, 3] and src.non_members == [4, 5, 6]
    assert src.caption(5) == "a drawing number 11"
    torch.testing.assert_close(src.image(5), decode_image(png(11), 8, "x"))
    assert src.verify() == {}
    assert "artist" in src.columns()
    assert src.column_values("artist", src.members) == ["ann", "bob", "ann", "bob"]
    digests = src.image_digests(src.members + src.non_members)
    assert len(set(digests.tolist())) == 7
    again = build_source(src.describe())
    assert again.fingerprint() == src.fingerprint()


def test_member_lists_of_mixed_kinds_and_their_metadata(tmp_path):
    (tmp_path / "img.png").write_bytes(png(3))
    (tmp_path / "members.jsonl").write_text(
        '{"file_name": "img.png", "text": "mine", "user": "u9"}\n'
    )
    dataset(2, 20, users=("z",)).save_to_disk(str(tmp_path / "reference"))
    src = MemberListSource(
        str(tmp_path / "members.jsonl"), str(tmp_path / "reference"), resolution=8
    )
    assert src.columns() == ["artist", "sid", "user"]
    assert src.column_values("user", src.members) == ["u9"]
    with pytest.raises(DataError, match="column 'user' has no value for 2 samples"):
        src.column_values("user", src.non_members)
    with pytest.raises(DataError, match="no per-sample column 'domain'"):
        src.column_values("domain", src.members)


def test_a_dataset_list_without_images_names_base_ids(tmp_path):
    dataset().save_to_disk(str(tmp_path / "base"))
    base = HFDatasetSource(str(tmp_path / "base"), id_column="sid", resolution=8).describe()
    datasets.Dataset.from_dict({"id": [100, 101], "user": ["p", "q"]}).save_to_disk(
        str(tmp_path / "s")
    )
    datasets.Dataset.from_dict({"id": [104]}).to_parquet(str(tmp_path / "r.parquet"))
    src = MemberListSource(
        str(tmp_path / "s"), str(tmp_path / "r.parquet"), base=base, resolution=8
    )
    assert src.members == [100, 101] and src.non_members == [104]
    assert src.rest == [102, 103, 105]
    assert src.column_values("user", [101]) == ["q"]
    assert src.column_values("artist", [104]) == ["bob"]  # from the base dataset


def test_a_member_list_dataset_without_captions_is_refused(tmp_path):
    datasets.Dataset.from_dict({"image": [png(0)], "label": [1]}).save_to_disk(str(tmp_path / "s"))
    datasets.Dataset.from_dict({"image": [png(1)], "label": [0]}).save_to_disk(str(tmp_path / "r"))
    with pytest.raises(DataError, match=r"no caption column \(text or caption\)"):
        MemberListSource(str(tmp_path / "s"), str(tmp_path / "r"), resolution=8)


def test_a_dataset_feeds_the_datamodule_and_parses_from_the_command_line(tmp_path):
    from jsonargparse import ArgumentParser

    from lightning_mia.data import MembershipDataModule
    from lightning_mia.data.sources import ImageCaptionSource

    dataset(24, users=("a", "b")).save_to_disk(str(tmp_path / "d"))
    parser = ArgumentParser()
    parser.add_argument("--source", type=ImageCaptionSource)
    cfg = parser.parse_args(
        [
            "--source=lightning_mia.data.hf_datasets.HFDatasetSource",
            f"--source.path={tmp_path / 'd'}",
            "--source.id_column=sid",
            "--source.resolution=8",
        ]
    )
    source = parser.instantiate_classes(cfg).source
    assert isinstance(source, HFDatasetSource) and len(source) == 24
    dm = MembershipDataModule(
        experiment=str(tmp_path / "exp"), source=source, num_shadows=1, batch_size=4
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 8, 8)
    sid = int(batch["sample_id"][0])
    assert batch["caption"][0] == source.caption(sid) and 100 <= sid < 124
