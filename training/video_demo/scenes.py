"""The video demo's world: one filled shape moving in a straight line across a flat background.

A clip is ``a {color} {shape} moving {direction}, {background} background``: the image demo's 8 CSS
named colors and 3 shapes, 4 directions and any background other than the shape's color -> 672
combinations. Per clip, the size, the speed, the start and the offset across the motion vary. The
shape is placed by its area centroid (as in the image demo) and stays inside the frame, clear of
the checker's border, for all 17 frames.

Clips are drawn with torch (a pixel is inside a shape when its centre is), batched, on any device,
so the GPU recipe draws fresh training clips every VAE step. Everything random comes from a
``numpy.random.Generator``, so a seed fixes the data.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import numpy as np
import torch

from training.demo.scenes import COLORS, IMAGE_SIZE, SHAPES
from training.demo.scenes import split_combos as _split_combos

NUM_FRAMES = 17  # 4k + 1 (Wan's VAE: 4x temporal compression) -> 5 latent frames
FPS = 8
# Unit step on the canvas (x right, y down) of each direction.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
SIZE_RANGE = (14, 20)  # bounding-box side in pixels, inclusive
SPEED_RANGE = (1.25, 2.0)  # pixels per frame: 20-32 pixels over a 17-frame clip
MARGIN = 3  # pixels between the shape and the frame's edge (the checker reads a 2-pixel border)

CAPTION_WORDS = ("a", "moving", "background") + tuple(COLORS) + SHAPES + tuple(DIRECTIONS)
_CAPTION_RE = re.compile(r"^an? (?P<color>\w+) (?P<shape>\w+) moving (?P<direction>\w+), (?P<background>\w+) background$")
_PALETTE = torch.tensor([COLORS[c] for c in COLORS], dtype=torch.uint8)
_COLOR_INDEX = {c: i for i, c in enumerate(COLORS)}


@dataclass(frozen=True)
class Combo:
    """What a caption says: the four facts the checker verifies (field order = fact order)."""

    color: str
    shape: str
    direction: str
    background: str

    def __post_init__(self):
        if self.color not in COLORS or self.background not in COLORS:
            raise ValueError(f"unknown color in {self}")
        if self.shape not in SHAPES or self.direction not in DIRECTIONS:
            raise ValueError(f"unknown shape or direction in {self}")
        if self.color == self.background:
            raise ValueError(f"shape and background share the color {self.color}")

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction}, {self.background} background"


@dataclass(frozen=True)
class Clip:
    """A combo plus what the caption leaves open: size, speed and the centroid at frame 0."""

    combo: Combo
    size: float = 16.0
    speed: float = 1.5
    x0: float = 32.0
    y0: float = 32.0

    @property
    def caption(self) -> str:
        return self.combo.caption

    def centroid(self, frame: int) -> tuple[float, float]:
        ux, uy = DIRECTIONS[self.combo.direction]
        return self.x0 + ux * self.speed * frame, self.y0 + uy * self.speed * frame


def parse_caption(text: str) -> Combo:
    """The combo a caption of the demo's form names ("an" and a capital first letter allowed);
    ValueError for any other text."""
    match = _CAPTION_RE.match(text.strip().lower())
    if not match:
        raise ValueError(f"not a video demo caption: {text!r}")
    return Combo(**match.groupdict())


def all_combos() -> list[Combo]:
    """The 672 valid combinations, in a fixed order."""
    return [Combo(c, s, d, b) for c, s, d, b in itertools.product(COLORS, SHAPES, DIRECTIONS, COLORS) if c != b]


def split_combos(seed: int, num_held_out: int) -> tuple[list[Combo], list[Combo]]:
    """(train, held_out), as the image demo splits: every pair of a held-out combo's facts occurs in training."""
    return _split_combos(seed, num_held_out, all_combos())


def extent(shape: str, size: float) -> tuple[float, float, float, float]:
    """(left, right, up, down): how far the shape reaches from its centroid (triangles: apex up,
    centroid 2/3 of the height below the apex)."""
    half = size / 2
    if shape == "triangle":
        return half, half, 2 * size / 3, size / 3
    return half, half, half, half


def sample_clip(rng: np.random.Generator, combos: list[Combo], num_frames: int = NUM_FRAMES) -> Clip:
    """A uniformly chosen combo with a random size, speed, start and cross-offset; the whole track
    of ``num_frames`` frames stays inside the frame with ``MARGIN`` to spare."""
    combo = combos[int(rng.integers(len(combos)))]
    size = float(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
    speed = float(rng.uniform(*SPEED_RANGE))
    left, right, up, down = extent(combo.shape, size)
    x_lo, x_hi = MARGIN + left, IMAGE_SIZE - MARGIN - right
    y_lo, y_hi = MARGIN + up, IMAGE_SIZE - MARGIN - down
    travel = speed * (num_frames - 1)
    ux, uy = DIRECTIONS[combo.direction]
    u, v = rng.uniform(0, 1, size=2)
    if ux:  # along x: the start leaves room for the travel; y anywhere
        x0 = x_lo + u * (x_hi - x_lo - travel) + (travel if ux < 0 else 0)
        y0 = y_lo + v * (y_hi - y_lo)
    else:
        y0 = y_lo + u * (y_hi - y_lo - travel) + (travel if uy < 0 else 0)
        x0 = x_lo + v * (x_hi - x_lo)
    return Clip(combo, size, speed, float(x0), float(y0))


def render_clips(clips: list[Clip], num_frames: int = NUM_FRAMES, device: torch.device | str = "cpu") -> torch.Tensor:
    """The clips as uint8 [N, T, 64, 64, 3]: flat background, one hard-edged filled shape per frame."""
    device = torch.device(device)
    n = len(clips)
    frames = torch.arange(num_frames, dtype=torch.float32)
    direction = torch.tensor([DIRECTIONS[c.combo.direction] for c in clips], dtype=torch.float32).view(n, 2)
    params = torch.tensor([(c.x0, c.y0, c.speed, c.size) for c in clips], dtype=torch.float32).view(n, 4)
    cx = params[:, 0:1] + direction[:, 0:1] * params[:, 2:3] * frames  # [N, T]
    cy = params[:, 1:2] + direction[:, 1:2] * params[:, 2:3] * frames
    shape = torch.tensor([SHAPES.index(c.combo.shape) for c in clips]).view(n, 1, 1, 1)
    fill = _PALETTE[[_COLOR_INDEX[c.combo.color] for c in clips]]
    background = _PALETTE[[_COLOR_INDEX[c.combo.background] for c in clips]]
    size = params[:, 3].view(n, 1, 1, 1)
    cx, cy, shape, size = (t.to(device) for t in (cx, cy, shape, size))
    centres = torch.arange(IMAGE_SIZE, dtype=torch.float32, device=device) + 0.5
    dx = centres.view(1, 1, 1, -1) - cx[..., None, None]  # [N, T, 1, W]
    dy = centres.view(1, 1, -1, 1) - cy[..., None, None]  # [N, T, H, 1]
    half = size / 2
    circle = dx * dx + dy * dy < half * half
    square = (dx.abs() < half) & (dy.abs() < half)
    # apex at dy = -2s/3, base at dy = s/3; the half-width grows from 0 at the apex to s/2 at the base
    triangle = (dy > -2 * size / 3) & (dy < size / 3) & (dx.abs() < (dy + 2 * size / 3) / 2)
    inside = torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))  # [N, T, H, W]
    return torch.where(inside[..., None], fill.to(device).view(n, 1, 1, 1, 3),
                       background.to(device).view(n, 1, 1, 1, 3))


def render(clip: Clip, num_frames: int = NUM_FRAMES) -> np.ndarray:
    """One clip as uint8 [T, 64, 64, 3]."""
    return render_clips([clip], num_frames)[0].numpy()


def sample_clips(seed: int, count: int, combos: list[Combo], num_frames: int = NUM_FRAMES) -> list[Clip]:
    rng = np.random.default_rng(seed)
    return [sample_clip(rng, combos, num_frames) for _ in range(count)]
