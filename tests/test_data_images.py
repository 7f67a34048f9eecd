"""Image decoding: every Pillow mode to RGB, resize + centre crop, bad files named in errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from lightning_mia.data.images import decode_image, tensor_to_pil, to_rgb, verify_image
from lightning_mia.data.sources import DataError


def rgb_at(img, xy=(0, 0)):
    out = to_rgb(img)
    assert out.mode == "RGB"
    return out.getpixel(xy)


def test_grayscale_and_bilevel():
    assert rgb_at(Image.new("L", (4, 4), 77)) == (77, 77, 77)
    assert rgb_at(Image.new("1", (4, 4), 1)) == (255, 255, 255)


def test_palette_with_transparency_goes_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0  # index 0 is transparent
    assert rgb_at(img, (0, 0)) == (255, 255, 255)
    assert rgb_at(img, (1, 1)) == (200, 100, 50)
    img.info.pop("transparency")
    assert rgb_at(img, (0, 0)) == (10, 20, 30)


def test_rgba_and_la_are_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.putpixel((1, 0), (255, 0, 0, 0))
    img.putpixel((2, 0), (0, 0, 0, 128))
    assert rgb_at(img, (0, 0)) == (255, 0, 0)
    assert rgb_at(img, (1, 0)) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in rgb_at(img, (2, 0)))
    assert rgb_at(Image.new("LA", (2, 2), (0, 0))) == (255, 255, 255)


def test_cmyk():
    assert rgb_at(Image.new("CMYK", (2, 2), (255, 0, 0, 0))) == (0, 255, 255)
    assert rgb_at(Image.new("CMYK", (2, 2), (0, 0, 0, 255))) == (0, 0, 0)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    assert img.mode.startswith("I;16")
    assert [rgb_at(img, (x, 0))[0] for x in range(3)] == [0, 128, 255]
    # through a 16-bit PNG file, as a scanner or medical dataset would store it
    Image.fromarray(np.full((6, 6), 40000, np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    x = decode_image(tmp_path / "g16.png", 4, "g16.png")  # 40000 / 257 -> 156
    assert x.shape == (3, 4, 4)
    assert torch.allclose(x, torch.full_like(x, 156 / 127.5 - 1))  # one float32 rounding


def test_float_and_32bit():
    assert rgb_at(Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)))[0] == 128
    assert rgb_at(Image.fromarray(np.full((2, 2), 65535, dtype=np.int32)))[0] == 255


FORMAT_MODES = [("png", m) for m in ("L", "LA", "P", "RGBA", "I;16", "RGB")] + [
    ("jpg", "L"),
    ("jpg", "CMYK"),
    ("jpg", "RGB"),
    ("webp", "RGBA"),
    ("webp", "RGB"),
    ("tiff", "CMYK"),
    ("tiff", "I;16"),
    ("gif", "P"),
    ("bmp", "RGB"),
]


@pytest.mark.parametrize(("fmt", "mode"), FORMAT_MODES)
def test_decode_every_mode_and_format(tmp_path, fmt, mode):
    base = Image.new("RGB", (40, 24), (200, 40, 40))
    img = (
        base.convert(mode)
        if mode != "I;16"
        else Image.fromarray(np.full((24, 40), 40000, np.uint16))
    )
    path = tmp_path / f"x.{fmt}"
    img.save(path)
    x = decode_image(path, 16, str(path))
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    expected = {"L": (87,) * 3, "LA": (87,) * 3, "I;16": (156,) * 3}.get(mode, (200, 40, 40))
    centre = tensor_to_pil(x).getpixel((8, 8))
    assert all(abs(a - b) <= 12 for a, b in zip(centre, expected)), (centre, expected)


def test_shorter_side_resize_and_centre_crop():
    # 30x10 image: left third red, middle third green, right third blue -> centre crop is green
    arr = np.zeros((10, 30, 3), np.uint8)
    arr[:, :10, 0] = arr[:, 10:20, 1] = arr[:, 20:, 2] = 255
    buf = __import__("io").BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = tensor_to_pil(decode_image(buf.getvalue(), 5, "mem"))
    assert out.size == (5, 5)
    r, g, b = out.getpixel((2, 2))
    assert g > 200 and r < 30 and b < 30


def test_large_jpeg_draft_decodes_to_resolution(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (800, 600), (10, 200, 10)).save(path, quality=90)
    x = decode_image(path, 32, str(path))
    assert x.shape == (3, 32, 32)
    assert tensor_to_pil(x).getpixel((16, 16))[1] > 180


def _bad_files(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good)
    jpg = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(jpg)
    cases = {
        "missing.png": None,
        "empty.png": b"",
        "text.png": b"this is not an image at all\n",
        "truncated.png": good.read_bytes()[: len(good.read_bytes()) // 2],
        "truncated.jpg": jpg.read_bytes()[: len(jpg.read_bytes()) // 2],
    }
    for name, data in cases.items():
        if data is not None:
            (tmp_path / name).write_bytes(data)
    return list(cases)


@pytest.mark.parametrize("index", range(5))
def test_bad_image_files_name_the_file(tmp_path, index):
    name = _bad_files(tmp_path)[index]
    for call in (lambda p: decode_image(p, 8, str(p)), lambda p: verify_image(p, str(p))):
        with pytest.raises(DataError, match=name.replace(".", r"\.")):
            call(tmp_path / name)
