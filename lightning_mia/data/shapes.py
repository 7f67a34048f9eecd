"""Procedural shapes: the embedded dataset, deterministic from a seed, no files.

Each image holds 1 to 3 objects (shape, colour, size, cell of a 3x3 grid) that its caption
describes exactly, e.g. "a big red circle at the top left and a small blue star in the center".
Each sample also carries hidden detail the caption does not say (background colour, gradient and
noise, position jitter, rotation, colour shade), so only memorisation reproduces it pixel for pixel.

    src = ShapesSource(num_samples=4096, resolution=32, seed=0)
    src.caption(7), src.image(7)  # str, (3, 32, 32) in [-1, 1]
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from lightning_mia.data.sources import (
    DIGEST_BYTES,
    DataError,
    DatasetFingerprint,
    ImageCaptionSource,
    register_source,
)

RENDER_VERSION = 1  # bump when rendering changes: it is part of the fingerprint
SUPERSAMPLE = 4  # draw at 4x and box-filter down: antialiased edges
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon")
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (240, 225, 40),
    "green": (50, 190, 60),
    "cyan": (40, 205, 215),
    "blue": (50, 90, 235),
    "purple": (155, 60, 205),
    "white": (240, 240, 240),
}
SIZES = {"small": 0.5, "big": 0.88}  # diameter as a fraction of a grid cell
PLACES = (  # grid cells in reading order
    "at the top left",
    "at the top",
    "at the top right",
    "on the left",
    "in the center",
    "on the right",
    "at the bottom left",
    "at the bottom",
    "at the bottom right",
)
NUM_OBJECTS_WEIGHTS = (0.2, 0.4, 0.4)  # P(1), P(2), P(3) objects
JITTER = 0.12  # hidden: centre offset, fraction of a cell
MAX_ROTATION = 20.0  # hidden: degrees; small enough that a square stays a square
SHADE = 18  # hidden: per-channel colour offset
NOISE_STD = 6.0  # hidden: background pixel noise, in 0..255 units


@dataclass(frozen=True)
class ShapeObject:
    """One object: what the caption says (shape, colour, size, cell) and hidden detail."""

    shape: str
    colour: str
    size: str
    cell: int  # 0..8, reading order
    dx: float  # hidden jitter, fraction of a cell
    dy: float
    angle: float  # hidden rotation, degrees
    shade: tuple[int, int, int]  # hidden colour offset

    def phrase(self) -> str:
        return f"a {self.size} {self.colour} {self.shape} {PLACES[self.cell]}"


@dataclass(frozen=True)
class Scene:
    """Everything that defines one image."""

    objects: tuple[ShapeObject, ...]
    background: tuple[int, int, int]  # hidden base colour (dark)
    gradient: tuple[float, float]  # hidden (angle in radians, strength in 0..255 units)
    noise_seed: int  # hidden per-pixel noise

    def caption(self) -> str:
        phrases = [o.phrase() for o in self.objects]
        if len(phrases) == 1:
            return phrases[0]
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def make_scene(seed: int, sample_id: int) -> Scene:
    """The scene of one sample: a pure function of (seed, sample_id), stable across versions."""
    rng = random.Random(f"lightning_mia.shapes:{seed}:{sample_id}")
    count = rng.choices((1, 2, 3), weights=NUM_OBJECTS_WEIGHTS)[0]
    cells = sorted(rng.sample(range(9), count))
    objects = tuple(
        ShapeObject(
            shape=rng.choice(SHAPES),
            colour=rng.choice(sorted(COLOURS)),
            size=rng.choice(sorted(SIZES)),
            cell=cell,
            dx=round(rng.uniform(-JITTER, JITTER), 4),
            dy=round(rng.uniform(-JITTER, JITTER), 4),
            angle=round(rng.uniform(-MAX_ROTATION, MAX_ROTATION), 2),
            shade=tuple(rng.randint(-SHADE, SHADE) for _ in range(3)),
        )
        for cell in cells
    )
    background = tuple(rng.randint(10, 70) for _ in range(3))
    gradient = (round(rng.uniform(0, 2 * math.pi), 4), round(rng.uniform(5, 40), 2))
    return Scene(objects, background, gradient, rng.getrandbits(63))


def _around(n: int, start: float, radii: tuple[float, ...] = (1.0,)) -> list[tuple]:
    """n points around the unit circle from angle `start`, radius cycling through `radii`."""
    return [
        (
            radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / n),
            radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / n),
        )
        for k in range(n)
    ]


_ARM = 0.32  # half-width of a cross arm
UNIT_POLYGONS = {  # vertices at radius 1, before rotation
    "square": [(1.2 * x, 1.2 * y) for x, y in _around(4, math.pi / 4)],  # as heavy as a circle
    "triangle": _around(3, -math.pi / 2),
    "diamond": [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)],
    "hexagon": _around(6, 0),
    "star": _around(10, -math.pi / 2, (1.0, 0.42)),
    "cross": [  # one arm (3 vertices) turned by 0, 90, 180, 270 degrees: (x, y) -> (-y, x)
        [(x, y), (-y, x), (-x, -y), (y, -x)][quarter]
        for quarter in range(4)
        for x, y in ((_ARM, _ARM), (_ARM, 1), (-_ARM, 1))
    ],
}


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple]:
    """Vertices of a polygonal shape of radius r centred at (cx, cy), rotated by angle."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in UNIT_POLYGONS[shape]]


def _object_mask(obj: ShapeObject, resolution: int) -> np.ndarray:
    """Coverage of one object, float (R, R) in [0, 1], antialiased by supersampling."""
    big = resolution * SUPERSAMPLE
    cell = big / 3
    cx = (obj.cell % 3 + 0.5 + obj.dx) * cell
    cy = (obj.cell // 3 + 0.5 + obj.dy) * cell
    r = SIZES[obj.size] * cell / 2
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    box = (cx - r, cy - r, cx + r, cy + r)
    if obj.shape == "circle":
        draw.ellipse(box, fill=255)
    elif obj.shape == "ring":
        draw.ellipse(box, fill=255)
        inner = r * 0.55
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    else:
        draw.polygon(_polygon(obj.shape, cx, cy, r, obj.angle), fill=255)
    return np.asarray(mask.reduce(SUPERSAMPLE), dtype=np.float32) / 255.0


def render_scene(scene: Scene, resolution: int) -> np.ndarray:
    """A scene as uint8 (R, R, 3)."""
    ys, xs = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / max(resolution - 1, 1)
    angle, strength = scene.gradient
    ramp = (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)  # (R, R) in ~[-0.7, 0.7]
    noise = np.random.default_rng(scene.noise_seed).normal(
        0, NOISE_STD, (resolution, resolution, 3)
    )
    img = np.asarray(scene.background, np.float32) + strength * ramp[..., None] + noise
    for obj in scene.objects:
        alpha = _object_mask(obj, resolution)[..., None]  # (R, R, 1)
        colour = np.clip(np.add(COLOURS[obj.colour], obj.shade), 0, 255).astype(np.float32)
        img = img * (1 - alpha) + colour * alpha
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


_FINGERPRINTS: dict[tuple, DatasetFingerprint] = {}  # (num_samples, resolution, seed, version)


@register_source("shapes")
class ShapesSource(ImageCaptionSource):
    """Procedural 1-3 coloured shapes on a 3x3 grid, each caption describing its image exactly."""

    def __init__(self, num_samples: int = 4096, resolution: int = 32, seed: int = 0) -> None:
        """
        Args:
            num_samples: number of samples; ids are 0..num_samples-1.
            resolution: side of the square images.
            seed: picks every scene; the same seed gives the same dataset.
        """
        super().__init__(resolution)
        if num_samples < 1:
            raise DataError(f"num_samples must be >= 1, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self._init_args = {"num_samples": num_samples, "resolution": resolution, "seed": seed}
        self._scenes: dict[int, Scene] = {}
        self._pixels: dict[tuple[int, int], torch.Tensor] = {}  # (id, R) -> uint8 (3, R, R)

    def _check(self, sample_id: int) -> int:
        if not 0 <= sample_id < self.num_samples:
            raise KeyError(f"sample id {sample_id} not in ShapesSource(0..{self.num_samples - 1})")
        return int(sample_id)

    def scene(self, sample_id: int) -> Scene:
        """The full description of a sample, hidden detail included."""
        sid = self._check(sample_id)
        if sid not in self._scenes:
            self._scenes[sid] = make_scene(self.seed, sid)
        return self._scenes[sid]

    def sample_ids(self) -> list[int]:
        return list(range(self.num_samples))

    def raw_caption(self, sample_id: int) -> str:
        return self.scene(sample_id).caption()

    def image(self, sample_id: int, resolution: int | None = None) -> torch.Tensor:
        res = resolution or self.resolution
        key = (self._check(sample_id), res)
        if key not in self._pixels:  # rendered lazily, kept: (3, R, R) uint8
            self._pixels[key] = torch.from_numpy(render_scene(self.scene(key[0]), res)).permute(
                2, 0, 1
            )
        return self._pixels[key].float().div(127.5).sub(1.0)

    def image_problems(self, ids: Sequence[int], stop_early: bool = False) -> dict[int, str]:
        """Images drawn in code from a seed: nothing to decode, nothing can be broken."""
        return {}

    def scene_json(self, sample_id: int) -> bytes:
        """The canonical JSON of a sample's scene: what its image digests are taken over."""
        return json.dumps(asdict(self.scene(sample_id)), sort_keys=True).encode()

    def image_digests(self, ids: Sequence[int]) -> np.ndarray:
        """A digest of each scene (which defines the pixels), without rendering."""
        raw = [hashlib.sha256(self.scene_json(i)).digest()[:DIGEST_BYTES] for i in ids]
        return np.array(raw, dtype=f"S{DIGEST_BYTES}")

    def dataset_fingerprint(self) -> DatasetFingerprint:
        """The fingerprint of every source with the same arguments, computed once per process
        (each query and stage of an experiment opens its own source and checks its splits)."""
        if self._fingerprint is None:
            key = (self.num_samples, self.resolution, self.seed, RENDER_VERSION)
            if key not in _FINGERPRINTS:
                _FINGERPRINTS[key] = super().dataset_fingerprint()
            self._fingerprint = _FINGERPRINTS[key]
        return self._fingerprint

    def images_sha256(self) -> str:
        """Scenes define the pixels (with RENDER_VERSION); hashing them avoids rendering all."""
        h = hashlib.sha256(f"render:{RENDER_VERSION}\n".encode())
        for sid in self.sample_ids():
            h.update(self.scene_json(sid) + b"\n")
        return h.hexdigest()
