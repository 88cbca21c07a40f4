"""Does the model make what it is asked? Generate held-out prompts with ditserve and check the pixels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import config
from .checker import FACTS, check_clip, direction_accuracy, fact_accuracy
from .scenes import Combo, split_combos

log = logging.getLogger(__name__)

GOAL = 0.9  # facts and direction


@dataclass
class Report:
    """Per prompt and seed: the combo, the facts checked and the clip."""

    combos: list[Combo]
    seeds: list[int]
    results: list[dict[str, float]]
    clips: list[np.ndarray]

    @property
    def accuracy(self) -> float:
        """Background, color and shape, frame by frame."""
        return fact_accuracy(self.results)

    @property
    def direction(self) -> float:
        return direction_accuracy(self.results)

    def per_fact(self) -> dict[str, float]:
        return {f: float(np.mean([r[f] for r in self.results])) for f in FACTS}

    def fully_right(self) -> int:
        return sum(all(v == 1.0 for v in r.values()) for r in self.results)

    def summary(self) -> str:
        parts = ", ".join(f"{f} {v:.1%}" for f, v in self.per_fact().items())
        return (f"{len(self.results)} clips, {self.fully_right()} fully right; facts {self.accuracy:.1%} "
                f"(per frame), direction {self.direction:.1%} ({parts})")

    def to_dict(self) -> dict:
        return {"clips": len(self.results), "fully_right": self.fully_right(), "facts": self.accuracy,
                "direction": self.direction, "per_fact": self.per_fact(),
                "goal_met": self.accuracy >= GOAL and self.direction >= GOAL,
                "wrong": [{"prompt": c.caption, "seed": s, **{f: r[f] for f in FACTS if r[f] < 1}}
                          for c, s, r in zip(self.combos, self.seeds, self.results) if min(r.values()) < 1]}


def held_out_combos(count: int | None = None) -> list[Combo]:
    """The combos the video demo model never saw (the first ``count`` of them)."""
    return split_combos(config.SEED, config.NUM_HELD_OUT)[1][:count]


def seen_combos(count: int = 48) -> list[Combo]:
    """``count`` of the combos the model was trained on (a fixed draw): for choosing sampling settings
    (the guidance scale) without looking at the held-out prompts the accuracy is reported on."""
    train = split_combos(config.SEED, config.NUM_HELD_OUT)[0]
    pick = np.random.default_rng(config.SEED + 7).choice(len(train), size=min(count, len(train)), replace=False)
    return [train[i] for i in sorted(pick)]


def evaluate(generator, combos: list[Combo], seeds: tuple[int, ...] = (0,), **request) -> Report:
    """Generate each combo's caption once per seed with a ditserve ``Generator`` and check the clips."""
    report = Report([], [], [], [])
    for combo in combos:
        for seed in seeds:
            clip = np.asarray(generator.generate(combo.caption, seed=seed, **request).videos[0])
            report.combos.append(combo)
            report.seeds.append(seed)
            report.results.append(check_clip(clip, combo))
            report.clips.append(clip)
    log.info("%s", report.summary())
    return report


def save_grid(report: Report, path: Path, columns: int = 8, every: int = 4) -> None:
    """Every ``every``-th frame of each clip side by side, one clip per row block (PNG)."""
    from PIL import Image

    strips = [np.concatenate(list(clip[::every]), axis=1) for clip in report.clips]
    h, w, _ = strips[0].shape
    rows = -(-len(strips) // columns) if len(strips) > columns else 1
    columns = min(columns, len(strips))
    grid = np.full((rows * h, columns * (w + 4), 3), 128, dtype=np.uint8)
    for i, strip in enumerate(strips):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * (w + 4):c * (w + 4) + w] = strip
    Image.fromarray(grid).save(path)

