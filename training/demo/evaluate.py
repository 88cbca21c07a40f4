"""Does the model draw what it is asked? Generate held-out prompts with ditserve and check the pixels."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import config
from .checker import FACTS, check
from .scenes import Combo, split_combos

log = logging.getLogger(__name__)


@dataclass
class Report:
    """Per prompt and seed: the combo, the facts checked and the image."""

    combos: list[Combo]
    seeds: list[int]
    results: list[dict[str, bool]]
    images: list[np.ndarray]

    @property
    def accuracy(self) -> float:
        facts = [ok for r in self.results for ok in r.values()]
        return sum(facts) / len(facts)

    def per_fact(self) -> dict[str, float]:
        return {f: float(np.mean([r[f] for r in self.results])) for f in FACTS}

    def summary(self) -> str:
        parts = ", ".join(f"{f} {v:.0%}" for f, v in self.per_fact().items())
        return (f"{len(self.results)} images, {sum(all(r.values()) for r in self.results)} fully right; "
                f"facts {self.accuracy:.1%} ({parts})")


def held_out_combos(count: int | None = None) -> list[Combo]:
    """The combos the demo model never saw (the first ``count`` of them)."""
    return split_combos(config.SEED, config.NUM_HELD_OUT)[1][:count]


def evaluate(generator, combos: list[Combo], seeds: tuple[int, ...] = (0,), **request) -> Report:
    """Generate each combo's caption once per seed with a ditserve ``Generator`` and check the images."""
    report = Report([], [], [], [])
    for combo in combos:
        for seed in seeds:
            image = np.asarray(generator.generate(combo.caption, seed=seed, **request).images[0])
            report.combos.append(combo)
            report.seeds.append(seed)
            report.results.append(check(image, combo))
            report.images.append(image)
    log.info("%s", report.summary())
    return report


def save_grid(report: Report, path: Path, columns: int = 8) -> None:
    """All images of a report in one PNG, row by row."""
    from PIL import Image

    images = report.images
    rows = -(-len(images) // columns)
    h, w, _ = images[0].shape
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    Image.fromarray(grid).save(path)
