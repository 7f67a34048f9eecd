"""MSCOCO captions: the official JSON (`captions_train2014.json`, `captions_val2017.json`) or the
Karpathy-split `dataset_coco.json`, plus the image folder.

    src = CocoSource("annotations/captions_train2014.json", "train2014", resolution=256)

COCO has about five captions per image; one is chosen per image from `caption_seed` (a pure
function of (seed, image id), so it does not depend on file order) and enters the fingerprint.
The sample id is the COCO image id.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from lightning_mia.data.files import ImageFileSource
from lightning_mia.data.sources import (
    DataError,
    caption_problem,
    file_digests,
    read_json,
    register_source,
)


def _official_entries(data: dict, where: str) -> tuple[dict[int, str], dict[int, list], list]:
    """(id -> file name, id -> captions, orphan problems) from the official captions format."""
    files: dict[int, str] = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("id"), int):
            raise DataError(f"{where}: images[{k}] has no integer 'id'")
        if not isinstance(img.get("file_name"), str):
            raise DataError(f"{where}: images[{k}] (id {img['id']}) has no 'file_name'")
        if img["id"] in files:
            raise DataError(f"{where}: image id {img['id']} is listed twice")
        files[img["id"]] = img["file_name"]
    captions: dict[int, list] = {i: [] for i in files}
    orphans = []
    for k, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataError(f"{where}: annotations[{k}] lacks 'image_id' or 'caption'")
        if ann["image_id"] not in captions:
            orphans.append((ann["image_id"], f"annotations[{k}] refers to image id not in images"))
            continue
        captions[ann["image_id"]].append(ann["caption"])
    return files, captions, orphans


def _karpathy_entries(
    data: dict, where: str, subsets: list[str] | None
) -> tuple[dict[int, str], dict[int, list]]:
    """(id -> relative path, id -> captions) from Karpathy's dataset_coco.json."""
    files: dict[int, str] = {}
    captions: dict[int, list] = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("cocoid"), int):
            raise DataError(f"{where}: images[{k}] has no integer 'cocoid'")
        if not isinstance(img.get("filename"), str) or not isinstance(img.get("sentences"), list):
            raise DataError(f"{where}: images[{k}] lacks 'filename' or 'sentences'")
        if subsets is not None and img.get("split") not in subsets:
            continue
        if img["cocoid"] in files:
            raise DataError(f"{where}: cocoid {img['cocoid']} is listed twice")
        files[img["cocoid"]] = str(Path(img.get("filepath", "")) / img["filename"])
        raws = [s.get("raw") if isinstance(s, dict) else s for s in img["sentences"]]
        captions[img["cocoid"]] = raws
    return files, captions


@register_source("coco")
class CocoSource(ImageFileSource):
    """MSCOCO image-caption pairs, one seeded caption per image, keyed by COCO image id."""

    def __init__(
        self,
        annotations: str,
        images: str,
        resolution: int = 256,
        caption_seed: int = 0,
        skip_bad_samples: bool = False,
        subsets: list[str] | None = None,
    ) -> None:
        """
        Args:
            annotations: captions JSON (official COCO captions or Karpathy's dataset_coco.json).
            images: image folder (Karpathy: the folder holding `filepath/filename`).
            resolution: side of the square images.
            caption_seed: picks one caption per image.
            skip_bad_samples: skip and record bad samples instead of raising.
            subsets: Karpathy `split` values to keep (e.g. ["train", "restval"]); None = all.
        """
        super().__init__(resolution, skip_bad_samples)
        self._init_args = {
            "annotations": str(annotations),
            "images": str(images),
            "resolution": resolution,
            "caption_seed": caption_seed,
            "skip_bad_samples": skip_bad_samples,
            "subsets": subsets,
        }
        self.annotations, self.images_root = Path(annotations), Path(images)
        self.caption_seed = caption_seed
        if not self.images_root.is_dir():
            raise DataError(f"COCO image folder {self.images_root}: no such folder")
        files, captions = self._read_annotations(subsets)
        self._ids = sorted(files)
        if not self._ids:
            raise DataError(f"{self.annotations}: lists no images")
        self._paths = {i: self._resolve(files[i]) for i in self._ids}
        self._captions: dict[int, list] = {}
        self._chosen: dict[int, Any] = {}
        for i in self._ids:
            self._captions[i] = self._good_captions(i, captions[i])
            self._chosen[i] = self._choose(i, self._captions[i] or captions[i] or [None])
            self._check_file(i)

    def _read_annotations(self, subsets: list[str] | None) -> tuple[dict, dict]:
        where = str(self.annotations)
        data = read_json(self.annotations, "COCO annotations")
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise DataError(f"{where}: not a COCO captions file (no 'images' list)")
        if isinstance(data.get("annotations"), list):
            files, captions, orphans = _official_entries(data, where)
            for image_id, problem in orphans:
                self.report_bad(image_id, f"{where}: {problem}")
            return files, captions
        if all(isinstance(img, dict) and "sentences" in img for img in data["images"][:1]):
            return _karpathy_entries(data, where, subsets)
        raise DataError(
            f"{where}: neither COCO captions format (images + annotations) "
            "nor Karpathy format (images with sentences)"
        )

    def _resolve(self, relative: str) -> Path:
        path = self.images_root / relative
        if not path.exists() and (self.images_root / Path(relative).name).exists():
            return self.images_root / Path(relative).name  # Karpathy file, flat image folder
        return path

    def _good_captions(self, image_id: int, raws: list) -> list[str]:
        good = []
        for raw in raws:
            problem = caption_problem(raw)
            if problem:
                self.report_bad(image_id, f"{self.annotations}: image id {image_id}: {problem}")
            else:
                good.append(raw)
        if not raws:
            self.report_bad(image_id, f"{self.annotations}: image id {image_id} has no caption")
        return good

    def _choose(self, image_id: int, options: list) -> Any:
        return random.Random(f"coco:{self.caption_seed}:{image_id}").choice(options)

    def _check_file(self, image_id: int) -> None:
        path = self._paths[image_id]
        if not path.is_file():
            self.report_bad(image_id, f"image {path} (id {image_id}): no such file")
        elif path.stat().st_size == 0:
            self.report_bad(image_id, f"image {path} (id {image_id}): empty file (0 bytes)")

    def sample_ids(self) -> list[int]:
        return list(self._ids)

    def raw_caption(self, sample_id: int) -> object:
        return self._chosen[sample_id]

    def captions(self, sample_id: int) -> list[str]:
        """Every usable caption of an image (the chosen one is `caption(sample_id)`)."""
        return list(self._captions[sample_id])

    def image_path(self, sample_id: int) -> Path:
        return self._paths[sample_id]

    def images_sha256(self) -> str:
        digests = file_digests([self._paths[i] for i in self._ids])
        h = hashlib.sha256()
        for i, d in zip(self._ids, digests):
            h.update(f"{i}\t{d}\n".encode())
        return h.hexdigest()
