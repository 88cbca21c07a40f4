"""Pixel statistics that say what a 64x64 demo image shows, to check it against its caption.

The checker knows nothing of the model: it reads an RGB image the way a person would.

* background: the median color of the 2-pixel border, named by the nearest CSS color;
* object: the pixels clearly unlike the background (farther than half the smallest gap between
  two named colors); its color is their median, named by the nearest CSS color; then every
  pixel nearer that color than the background's belongs to it, and the largest 4-connected
  region of those is the object;
* position: the named anchor nearest the object's centroid (regions are Voronoi cells);
* shape: the object's area over its bounding box's: square ~1, circle ~pi/4, triangle ~1/2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import COLORS, POSITIONS, Combo

FACTS = ("background", "color", "position", "shape")
BORDER = 2
# Fill-ratio thresholds halfway between the ideal ratios (1/2, pi/4, 1).
TRIANGLE_MAX_FILL = (0.5 + np.pi / 4) / 2
CIRCLE_MAX_FILL = (np.pi / 4 + 1.0) / 2
MIN_OBJECT_PIXELS = 16

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float64)
_MIN_GAP = min(np.linalg.norm(a - b) for i, a in enumerate(_PALETTE) for b in _PALETTE[i + 1:])


@dataclass(frozen=True)
class Measurement:
    """What the image shows; ``color``, ``position`` and ``shape`` are None without an object."""

    background: str
    color: str | None
    position: str | None
    shape: str | None
    centroid: tuple[float, float] | None = None
    fill: float | None = None
    area: int = 0


def nearest_color(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_PALETTE - rgb, axis=-1)))]


def nearest_position(x: float, y: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def shape_from_fill(fill: float) -> str:
    if fill < TRIANGLE_MAX_FILL:
        return "triangle"
    return "circle" if fill < CIRCLE_MAX_FILL else "square"


def measure(image: np.ndarray) -> Measurement:
    """Read background, object color, position and shape off a uint8 [H, W, 3] image."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {img.shape}")
    border = np.ones(img.shape[:2], dtype=bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    bg_rgb = np.median(img[border], axis=0)
    background = nearest_color(bg_rgb)

    dist_bg = np.linalg.norm(img - bg_rgb, axis=-1)
    unlike = dist_bg > _MIN_GAP / 2
    if unlike.sum() < MIN_OBJECT_PIXELS:
        return Measurement(background, None, None, None)
    obj_rgb = np.median(img[unlike], axis=0)
    mask = largest_component(np.linalg.norm(img - obj_rgb, axis=-1) < dist_bg)
    area = int(mask.sum())
    if area < MIN_OBJECT_PIXELS:
        return Measurement(background, None, None, None, area=area)
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = area / box
    return Measurement(background, nearest_color(np.median(img[mask], axis=0)), nearest_position(cx, cy),
                       shape_from_fill(fill), (float(cx), float(cy)), float(fill), area)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (ties: the first found in raster order).

    Vectorised: every pixel of the mask starts labelled with its own raster index and takes the
    smallest label among itself and its 4 neighbours (with pointer jumping) until nothing changes,
    so each region ends labelled by its first pixel in raster order.
    """
    h, w = mask.shape
    if not mask.any():
        return np.zeros_like(mask)
    big = h * w
    index = np.arange(big).reshape(h, w)
    labels = np.where(mask, index, big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2],
                                        padded[1:-1, 2:]])
        new = np.where(mask, neighbours, big)
        flat = new.ravel()
        inside = flat < big
        flat[inside] = np.minimum(flat[inside], flat[flat[inside]])  # pointer jumping: a label's own label
        if np.array_equal(new, labels):
            break
        labels = new
    found, sizes = np.unique(labels[mask], return_counts=True)
    best = found[np.argmax(sizes)]  # argmax takes the first of equal sizes: the smallest label
    return labels == best


def check(image: np.ndarray, combo: Combo) -> dict[str, bool]:
    """For each of the four facts the caption states, whether the image shows it."""
    m = measure(image)
    return {"background": m.background == combo.background, "color": m.color == combo.color,
            "position": m.position == combo.position, "shape": m.shape == combo.shape}


def agreement(results: list[dict[str, bool]]) -> float:
    """The fraction of all checked facts that hold."""
    facts = [ok for r in results for ok in r.values()]
    return sum(facts) / len(facts) if facts else 0.0
