"""Decode any image a dataset may hold into one tensor format: RGB, square, (3, R, R) in [-1, 1].

Grayscale, palette (with or without transparency), RGBA/LA (composited on white), CMYK, 16-bit
and float images are all converted to 8-bit RGB first; then the shorter side is resized to R and
the centre is cropped. Every failure is a `DataError` naming the file and the problem.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from lightning_mia.data.sources import CHECK_RESOLUTION, DataError

WHITE = (255, 255, 255)
RESAMPLE = Image.Resampling.BICUBIC  # antialiased when downscaling (Pillow filters by scale)
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit or 32-bit integer grayscale -> 8-bit "L" by scaling (Pillow's convert clips)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode in SIXTEEN_BIT_MODES or arr.max(initial=0) > 255:
        arr = arr / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _float_to_l(img: Image.Image) -> Image.Image:
    """Float grayscale -> "L"; values in [0, 1] are taken as unit range, others as 0..255."""
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    if arr.size and arr.max() <= 1.0 and arr.min() >= 0.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Any Pillow image -> 8-bit "RGB"; transparency is composited on `background`."""
    img = ImageOps.exif_transpose(img)  # camera photos: honour the orientation tag
    if img.mode in SIXTEEN_BIT_MODES or img.mode == "I":
        img = _sixteen_bit_to_l(img)
    elif img.mode == "F":
        img = _float_to_l(img)
    has_alpha = img.mode in ALPHA_MODES or "transparency" in img.info
    if has_alpha:
        with warnings.catch_warnings():  # "palette images with transparency ... RGBA" notice
            warnings.simplefilter("ignore")
            rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    return img


def square_crop_resize(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution` and crop the centre square, in one resample."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2
    box = (left, top, left + side, top + side)
    return img.resize((resolution, resolution), RESAMPLE, box=box, reducing_gap=3.0)


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """An "RGB" image -> float tensor (3, H, W) in [-1, 1]."""
    arr = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """A tensor (3, H, W) in [-1, 1] -> "RGB" image (for previews and tests)."""
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte()  # (3, H, W)
    return Image.fromarray(arr.permute(1, 2, 0).cpu().numpy(), mode="RGB")


def open_image(data: bytes | str | os.PathLike, name: str) -> Image.Image:
    """Open and fully decode an image file or its bytes; `name` says where it came from."""
    if isinstance(data, bytes):
        if not data:
            raise DataError(f"image {name}: empty (0 bytes)")
        fp: io.BytesIO | Path = io.BytesIO(data)
    else:
        fp = Path(data)
        if not fp.is_file():
            raise DataError(f"image {name}: no such file")
        if fp.stat().st_size == 0:
            raise DataError(f"image {name}: empty file (0 bytes)")
    try:
        img = Image.open(fp)
    except UnidentifiedImageError as err:
        raise DataError(f"image {name}: not an image file Pillow can read (or cut short)") from err
    except (OSError, Image.DecompressionBombError) as err:
        raise DataError(f"image {name}: truncated or corrupt ({err})") from err
    return img


def decode_image(data: bytes | str | os.PathLike, resolution: int, name: str) -> torch.Tensor:
    """Image file or bytes -> tensor (3, R, R) in [-1, 1]; `DataError` naming `name` on failure."""
    img = open_image(data, name)
    try:
        if img.format == "JPEG":
            img.draft("RGB", (resolution, resolution))  # decode at a reduced scale when large
        img.load()
        img = square_crop_resize(to_rgb(img), resolution)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"image {name}: truncated or corrupt ({err})") from err
    return pil_to_tensor(img)


def image_problem(data: bytes | str | os.PathLike) -> str | None:
    """Why an image file (or its bytes) cannot be used, after decoding all of it; None if it can.

    `Image.open` alone reads only the header, so a PNG cut short or text named `.jpg` may pass
    it. Here `verify()` checks the file's structure (e.g. every PNG chunk's CRC), then a fresh
    `load()` decodes every pixel and the image is converted and resized as `decode_image` does.
    """
    if not isinstance(data, bytes):
        path = Path(data)
        if not path.is_file():
            return "no such file"
        try:
            data = path.read_bytes()
        except OSError as err:
            return f"cannot be read ({err.strerror or err})"
    if not data:
        return "empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.verify()
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            square_crop_resize(to_rgb(img), CHECK_RESOLUTION)
    except UnidentifiedImageError:
        return "not an image file Pillow can read (or cut short)"
    except Image.DecompressionBombError as err:
        return f"too large to decode ({err})"
    except Exception as err:  # noqa: BLE001  (a decoder fed bad bytes may raise anything)
        return f"truncated or corrupt ({type(err).__name__}: {err})"
    return None


def verify_image(data: bytes | str | os.PathLike, name: str) -> None:
    """Fully decode an image (see `image_problem`); `DataError` naming `name` if it fails."""
    problem = image_problem(data)
    if problem:
        raise DataError(f"image {name}: {problem}")
