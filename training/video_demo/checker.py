"""Pixel statistics that say what a video demo clip shows, to check it against its caption.

Like the image demo's checker, it knows nothing of the model:

* per frame, the image demo's ``measure``: background (median of the 2-pixel border), the
  object's color (the largest region clearly unlike the background) and shape (its fill of its
  bounding box);
* across frames, the direction of motion: a straight line fitted to the object's centroid track
  (frames where an object was found, at least half of them); the axis that moved more, by its
  sign, once the fitted travel over the clip is at least ``MIN_TRAVEL`` pixels; otherwise "none".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.demo.checker import Measurement, measure

from .scenes import Combo

FRAME_FACTS = ("background", "color", "shape")  # read off each frame
FACTS = FRAME_FACTS + ("direction",)  # direction: read off the whole clip
MIN_TRAVEL = 8.0  # pixels over the clip (the demo's clips travel 20-32)


@dataclass(frozen=True)
class ClipMeasurement:
    frames: tuple[Measurement, ...]
    direction: str  # left, right, up, down or "none"
    travel: tuple[float, float] = (0.0, 0.0)  # fitted (dx, dy) over the clip, pixels


def direction_of(track: list[tuple[int, float, float]], num_frames: int) -> tuple[str, tuple[float, float]]:
    """(direction, fitted travel) of a centroid track [(frame, x, y), ...] over ``num_frames`` frames."""
    if len(track) < max(2, (num_frames + 1) // 2):
        return "none", (0.0, 0.0)
    t, x, y = (np.asarray(v, dtype=np.float64) for v in zip(*track))
    dx = float(np.polyfit(t, x, 1)[0]) * (num_frames - 1)
    dy = float(np.polyfit(t, y, 1)[0]) * (num_frames - 1)
    if max(abs(dx), abs(dy)) < MIN_TRAVEL:
        return "none", (dx, dy)
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), (dx, dy)
    return ("down" if dy > 0 else "up"), (dx, dy)


def measure_clip(frames: np.ndarray) -> ClipMeasurement:
    """Read each frame of a uint8 [T, H, W, 3] clip, then the direction of motion."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected a clip [T, H, W, 3], got shape {frames.shape}")
    measured = tuple(measure(f) for f in frames)
    track = [(i, *m.centroid) for i, m in enumerate(measured) if m.centroid is not None]
    direction, travel = direction_of(track, len(frames))
    return ClipMeasurement(measured, direction, travel)


def check_clip(frames: np.ndarray, combo: Combo) -> dict[str, float]:
    """Per fact, how far the clip shows it: for background, color and shape the fraction of frames
    that show it; for direction 1.0 or 0.0."""
    m = measure_clip(frames)
    n = len(m.frames)
    return {"background": sum(f.background == combo.background for f in m.frames) / n,
            "color": sum(f.color == combo.color for f in m.frames) / n,
            "shape": sum(f.shape == combo.shape for f in m.frames) / n,
            "direction": float(m.direction == combo.direction)}


def fact_accuracy(results: list[dict[str, float]]) -> float:
    """The fraction of checked facts that hold: the per-frame facts frame by frame, over all clips."""
    values = [r[f] for r in results for f in FRAME_FACTS]
    return float(np.mean(values)) if values else 0.0


def direction_accuracy(results: list[dict[str, float]]) -> float:
    return float(np.mean([r["direction"] for r in results])) if results else 0.0
