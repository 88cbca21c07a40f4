"""What a generation returns."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CACHE_STATS_KEY = "cache_stats"  # where a step cache counts, in a run's per-branch step-context states


@dataclass
class CacheStats:
    """What a step cache did in one run: DiT forward calls (cond and uncond counted separately when
    run as two passes; a batched CFG forward counts once) and how many of them reused cached work."""

    method: str
    forwards: int = 0
    skipped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "forwards": self.forwards, "skipped": self.skipped}

    @classmethod
    def gather(cls, states: Iterable[dict]) -> "CacheStats | None":
        """The sum of the counts a step cache left in a run's per-branch states; None when no cache ran."""
        parts = [s[CACHE_STATS_KEY] for s in states if CACHE_STATS_KEY in s]
        if not parts:
            return None
        return cls(parts[0].method, sum(p.forwards for p in parts), sum(p.skipped for p in parts))


@dataclass
class Timings:
    """Wall times of one pipeline run: per stage and per denoising step, in seconds; with a step
    cache, what it skipped; on a GPU, each stage's peak allocated memory in GiB (None elsewhere).
    `load`: on the engine's first run after it started, how long the start took, in seconds
    ("weights": reading the model folder into the pipeline, "setup": speed transforms and memory
    placement, "warmup": compile warm-up, "total"); not part of `total_s`."""

    stages: dict[str, float] = field(default_factory=dict)
    steps: list[float] = field(default_factory=list)
    cache: CacheStats | None = None
    peak_memory_gib: dict[str, float] | None = None
    load: dict[str, float] | None = None

    @property
    def total_s(self) -> float:
        return sum(self.stages.values())

    def to_dict(self) -> dict[str, Any]:
        steps = self.steps
        out = {
            "total_s": self.total_s,
            "stages": dict(self.stages),
            "steps": list(steps),
            "mean_step_s": sum(steps) / len(steps) if steps else None,
        }
        if self.cache is not None:
            out["cache"] = self.cache.to_dict()
        if self.peak_memory_gib is not None:
            out["peak_memory_gib"] = dict(self.peak_memory_gib)
        if self.load is not None:
            out["load_s"] = dict(self.load)
        return out


@dataclass
class GenerationOutput:
    """What one request made — images (PIL), or for a video model videos (uint8 numpy arrays
    [frames, height, width, 3], shown at `fps`) — and how long each part took."""

    images: list[Any]
    timings: Timings
    seed: int
    videos: list[Any] = field(default_factory=list)
    fps: int | None = None
