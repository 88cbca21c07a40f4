"""What a generation returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Timings:
    """Wall times of one pipeline run: per stage and per denoising step, in seconds."""

    stages: dict[str, float] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return sum(self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        steps = self.steps
        return {
            "total_s": self.total_s,
            "stages": dict(self.stages),
            "steps": list(steps),
            "mean_step_s": sum(steps) / len(steps) if steps else None,
        }


@dataclass
class GenerationOutput:
    """What one request made — images (PIL), or for a video model videos (uint8 numpy arrays
    [frames, height, width, 3], shown at `fps`) — and how long each part took."""

    images: list[Any]
    timings: Timings
    seed: int
    videos: list[Any] = field(default_factory=list)
    fps: int | None = None
