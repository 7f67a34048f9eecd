"""The procedural shapes dataset: deterministic, captions exact, hidden per-sample detail."""

import re
from collections import defaultdict

import numpy as np
import pytest
import torch

from lightning_mia.data.shapes import COLOURS, PLACES, SHAPES, SIZES, ShapesSource, make_scene

LONGEST_FIRST = sorted(PLACES, key=len, reverse=True)  # "at the top right" before "at the top"
PHRASE = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(LONGEST_FIRST)})(?:,| and|$)"
)


@pytest.fixture(scope="module")
def captions():
    return [ShapesSource().caption(i) for i in range(4096)]


def test_deterministic_from_seed():
    a, b, c = ShapesSource(64, seed=3), ShapesSource(64, seed=3), ShapesSource(64, seed=4)
    assert [a.caption(i) for i in range(64)] == [b.caption(i) for i in range(64)]
    assert all(torch.equal(a.image(i), b.image(i)) for i in range(0, 64, 7))
    assert sum(a.caption(i) != c.caption(i) for i in range(64)) > 50
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert a.sample_ids() == list(range(64))


def test_thousands_of_distinct_captions(captions):
    assert len(set(captions)) >= 3000


def test_caption_describes_every_object_exactly(captions):
    src = ShapesSource(resolution=48)
    for sid in range(40):
        scene = src.scene(sid)
        phrases = PHRASE.findall(captions[sid])
        assert len(phrases) == len(scene.objects) in (1, 2, 3)
        described = [(o.size, o.colour, o.shape, PLACES[o.cell]) for o in scene.objects]
        assert phrases == described
        # the named colour is really there, at the named grid cell (centre of the object)
        img = ((src.image(sid) + 1) * 127.5).permute(1, 2, 0).numpy()  # (R, R, 3)
        for obj in scene.objects:
            if obj.shape == "ring":
                continue  # a ring's centre is background
            x = int((obj.cell % 3 + 0.5 + obj.dx) * 16)
            y = int((obj.cell // 3 + 0.5 + obj.dy) * 16)
            centre = img[y, x]
            assert np.abs(centre - np.array(COLOURS[obj.colour])).max() < 45, (sid, obj)


def test_hidden_detail_same_caption_different_pixels(captions):
    by_caption = defaultdict(list)
    for sid, cap in enumerate(captions):
        by_caption[cap].append(sid)
    pairs = [ids[:2] for ids in by_caption.values() if len(ids) > 1]
    assert len(pairs) >= 10
    src = ShapesSource()
    for a, b in pairs[:10]:
        diff = (src.image(a) - src.image(b)).abs()
        assert diff.mean() > 0.02  # background, jitter, rotation, shade all differ
        assert make_scene(0, a).caption() == make_scene(0, b).caption()


def test_images_tensor_format_and_resolution_independence():
    small, big = ShapesSource(16, resolution=32), ShapesSource(16, resolution=64)
    x = small.image(5)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert small.image(5, resolution=64).shape == (3, 64, 64)
    # the dataset (captions, fingerprint) does not depend on the rendering resolution
    assert small.fingerprint() == big.fingerprint()
    assert small.caption(5) == big.caption(5)
    with pytest.raises(KeyError, match="16"):
        small.image(16)


def test_each_image_is_rendered_once_per_resolution():
    # (how fast rendering is: benchmarks/bench_data_metrics.py; a test must not time anything)
    src = ShapesSource(16)
    first = [src.image(i) for i in range(16)]
    cached = dict(src._pixels)  # (id, resolution) -> the rendered uint8 pixels
    assert len(cached) == 16
    assert all(torch.equal(src.image(i), first[i]) for i in range(16))
    assert all(src._pixels[k] is v for k, v in cached.items())  # read back, not rendered again
    big = src.image(3, resolution=64)
    assert big.shape == (3, 64, 64) and len(src._pixels) == 17  # each resolution on its own
    assert torch.equal(src.image(3), first[3])
