"""The demo's synthetic world: one filled shape on a flat background, drawn with PIL, and its caption.

A scene is ``a {color} {shape} on the {position}, {background} background``: 8 CSS named colors,
3 shapes, 5 positions and any background color other than the shape's -> 840 combinations.
Size and a small offset vary per image. Each shape is placed by its *area centroid* (not its
bounding box), so the measured centroid of a drawn shape sits within the offset of its anchor.

Everything random takes a ``numpy.random.Generator``, so a seed fixes the data.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64

# CSS named colors (CSS Color Module Level 4).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "white": (255, 255, 255), "black": (0, 0, 0), "orange": (255, 165, 0), "purple": (128, 0, 128),
}
SHAPES = ("circle", "square", "triangle")
# Anchor (x, y) of each position on the 64x64 canvas; the regions are their Voronoi cells.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (16.0, 32.0), "right": (48.0, 32.0), "top": (32.0, 16.0), "bottom": (32.0, 48.0),
    "center": (32.0, 32.0),
}
SIZE_RANGE = (16, 24)  # bounding-box side in pixels, inclusive
MAX_OFFSET = 3  # pixels the centroid may move from its anchor, per axis

CAPTION_WORDS = ("a", "on", "the", "background") + tuple(COLORS) + SHAPES + tuple(POSITIONS)
_CAPTION_RE = re.compile(
    r"^a (?P<color>\w+) (?P<shape>\w+) on the (?P<position>\w+), (?P<background>\w+) background$")


@dataclass(frozen=True)
class Combo:
    """What a caption says: the four facts the checker verifies."""

    color: str
    shape: str
    position: str
    background: str

    def __post_init__(self):
        if self.color not in COLORS or self.background not in COLORS:
            raise ValueError(f"unknown color in {self}")
        if self.shape not in SHAPES or self.position not in POSITIONS:
            raise ValueError(f"unknown shape or position in {self}")
        if self.color == self.background:
            raise ValueError(f"shape and background share the color {self.color}")

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on the {self.position}, {self.background} background"


@dataclass(frozen=True)
class Scene:
    """A combo plus the details the caption leaves open."""

    combo: Combo
    size: int = 20
    dx: int = 0
    dy: int = 0

    @property
    def caption(self) -> str:
        return self.combo.caption

    @property
    def centroid(self) -> tuple[float, float]:
        ax, ay = POSITIONS[self.combo.position]
        return ax + self.dx, ay + self.dy


def parse_caption(text: str) -> Combo:
    """The combo a caption of the demo's form names; ValueError for any other text."""
    match = _CAPTION_RE.match(text.strip().lower())
    if not match:
        raise ValueError(f"not a demo caption: {text!r}")
    return Combo(**match.groupdict())


def all_combos() -> list[Combo]:
    """The 840 valid combinations, in a fixed order."""
    return [Combo(c, s, p, b) for c, s, p, b in itertools.product(COLORS, SHAPES, POSITIONS, COLORS)
            if c != b]


def split_combos(seed: int, num_held_out: int, combos: list | None = None) -> tuple[list, list]:
    """(train, held_out): ``num_held_out`` combos never shown in training, drawn from ``seed``.

    A held-out combo is accepted only while every pair of its facts (color+shape,
    color+background, shape+position, ...) still occurs in the remaining training
    combos, so each held-out prompt composes things the model has seen together.
    ``combos`` (default: this demo's ``all_combos()``) may be any list of frozen dataclasses
    whose fields are the facts (the video demo passes its own).
    """
    combos = all_combos() if combos is None else list(combos)
    order = np.random.default_rng(seed).permutation(len(combos))
    held: list[Combo] = []
    pair_counts = _pair_counts(combos)
    for i in order:
        if len(held) == num_held_out:
            break
        pairs = _pairs(combos[i])
        if all(pair_counts[p] > 1 for p in pairs):
            for p in pairs:
                pair_counts[p] -= 1
            held.append(combos[i])
    if len(held) < num_held_out:
        raise ValueError(f"cannot hold out {num_held_out} combos and keep every pair in training")
    held_set = set(held)
    return [c for c in combos if c not in held_set], sorted(held, key=combos.index)


def _pairs(c) -> list[tuple]:
    facts = tuple((f.name, getattr(c, f.name)) for f in dataclasses.fields(c))
    return list(itertools.combinations(facts, 2))


def _pair_counts(combos: list) -> dict[tuple, int]:
    counts: dict[tuple, int] = {}
    for c in combos:
        for p in _pairs(c):
            counts[p] = counts.get(p, 0) + 1
    return counts


def sample_scene(rng: np.random.Generator, combos: list[Combo]) -> Scene:
    """A uniformly chosen combo with a random size and offset."""
    combo = combos[int(rng.integers(len(combos)))]
    size = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    dx, dy = (int(v) for v in rng.integers(-MAX_OFFSET, MAX_OFFSET + 1, size=2))
    return Scene(combo, size, dx, dy)


def render(scene: Scene) -> np.ndarray:
    """The scene as uint8 [64, 64, 3]: a flat background and one filled, hard-edged shape."""
    combo = scene.combo
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLORS[combo.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[combo.color]
    cx, cy = scene.centroid
    half = scene.size / 2
    # PIL's bounding boxes include their right/bottom edge: a box [x0, x0 + s - 1] is s pixels.
    x0, x1 = cx - half, cx + half - 1
    if combo.shape == "circle":
        draw.ellipse((x0, cy - half, x1, cy + half - 1), fill=fill)
    elif combo.shape == "square":
        draw.rectangle((x0, cy - half, x1, cy + half - 1), fill=fill)
    else:  # apex up; a triangle's centroid lies 2/3 of the height below its apex
        top, base = cy - 2 * scene.size / 3, cy + scene.size / 3 - 1
        draw.polygon([(x0, base), (x1, base), ((x0 + x1) / 2, top)], fill=fill)
    return np.asarray(image, dtype=np.uint8).copy()


def render_dataset(seed: int, count: int, combos: list[Combo]) -> tuple[np.ndarray, list[Scene]]:
    """``count`` scenes drawn from ``combos`` with ``seed``: images uint8 [N, 64, 64, 3] and scenes."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, combos) for _ in range(count)]
    images = np.empty((count, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        images[i] = render(scene)
    return images, scenes
