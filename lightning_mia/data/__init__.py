"""Image-caption data: readers behind one interface, membership splits, the DataModule.

from lightning_mia.data import MembershipDataModule, ShapesSource, CocoSource
"""

from lightning_mia.data.coco import CocoSource
from lightning_mia.data.datamodule import MembershipDataModule, SampleDataset, collate_samples
from lightning_mia.data.imagefolder import ImageFolderSource
from lightning_mia.data.member_lists import MemberListSource
from lightning_mia.data.samplers import ShardedSampler
from lightning_mia.data.shapes import ShapesSource
from lightning_mia.data.sources import (
    SOURCES,
    DataError,
    DatasetFingerprint,
    ImageCaptionSource,
    build_source,
    register_source,
)
from lightning_mia.data.splits import (
    SplitRow,
    Splits,
    ensure_splits,
    load_splits,
    make_splits,
    save_splits,
)
from lightning_mia.data.webdataset import WebDatasetSource

__all__ = [
    "SOURCES",
    "CocoSource",
    "DataError",
    "DatasetFingerprint",
    "ImageCaptionSource",
    "ImageFolderSource",
    "MemberListSource",
    "MembershipDataModule",
    "SampleDataset",
    "ShapesSource",
    "ShardedSampler",
    "SplitRow",
    "Splits",
    "WebDatasetSource",
    "build_source",
    "collate_samples",
    "ensure_splits",
    "load_splits",
    "make_splits",
    "register_source",
    "save_splits",
]
