"""What every family pipeline shares: its typed batch, stage timing and the run contract."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from torch import nn

from ditserve.api import GenerationRequest, ModelLimits, RequestDefaults, Timings
from ditserve.api.errors import Cancelled

log = logging.getLogger(__name__)

__all__ = ["Cancelled", "Frames", "Pipeline", "Pixels", "RunControl", "StageTimer"]  # Cancelled: api.errors'


@dataclass
class RunControl:
    """How a run reports progress and learns it should stop (checked before every stage and
    between denoising steps)."""

    progress_bar: bool = False
    should_stop: Callable[[], bool] = lambda: False
    on_step: Callable[[int, int], None] = lambda step, total: None


@dataclass
class Pixels:
    """Decoded images, uint8 [N, H, W, 3] (or 4 channels: RGBA), in request order: num_images x
    `per_image` per request (Qwen-Image-Layered: the RGBA layers of each image; otherwise 1)."""

    images: np.ndarray
    per_image: int = 1


@dataclass
class Frames:
    """Decoded videos, uint8 [N, F, H, W, 3], in request order (num_images videos per request)."""

    videos: np.ndarray


@dataclass
class StageTimer:
    """Records each stage's wall time (synchronising the device first) and per-step times."""

    device: torch.device
    timings: Timings = field(default_factory=Timings)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.sync()
        if self.device.type == "cuda":  # each stage's own peak (GPU memory)
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        yield
        self.sync()
        elapsed = time.perf_counter() - start
        self.timings.stages[name] = self.timings.stages.get(name, 0.0) + elapsed
        if self.device.type == "cuda":
            peaks = self.timings.peak_memory_gib = self.timings.peak_memory_gib or {}
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated(self.device) / 2**30)
        log.info("stage %-16s %.3f s", name, elapsed)

    def step_clock(self) -> "StepClock":
        return StepClock(self.device)


class StepClock:
    """Per-step wall times without a host sync per step: CUDA events on GPU, a clock on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.tick()

    def tick(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class Pipeline:
    """A loaded model family. Subclasses set the class-level spec and implement the stages.

    `dit_names` are the attributes holding DiTs (several for expert models, e.g. Wan 2.2 A14B):
    the engine accelerates each one. `components()` lists every loaded module by name (offload,
    memory reports).
    """

    defaults: ClassVar[RequestDefaults] = RequestDefaults()
    limits: ClassVar[ModelLimits] = ModelLimits()
    dit_names: ClassVar[tuple[str, ...]] = ("dit",)

    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, path: Path, device: torch.device, dtype: torch.dtype) -> "Pipeline":
        raise NotImplementedError

    @classmethod
    def batch_key(cls, req: GenerationRequest) -> tuple:
        """Requests with equal keys can run as one batch (a class method: the server, which never
        loads weights, computes it too)."""
        return (req.height, req.width, req.num_inference_steps, req.do_true_cfg, req.max_sequence_length,
                req.sampler, req.flow_shift, req.num_frames)

    @classmethod
    def for_folder(cls, path: Path, defaults: RequestDefaults, limits: ModelLimits):
        """The request defaults and limits for this folder (a family whose folders differ — e.g.
        Wan's TI2V-5B — adjusts them; read from configs, before any weights load)."""
        return defaults, limits

    def components(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def run(self, requests: list[GenerationRequest], control: RunControl) -> tuple[Pixels | Frames, Timings]:
        """Generate for resolved, validated, batch-compatible requests, stage by stage; a run
        nobody wants any more stops at the next stage boundary (or denoising step).

        Families implement the stages with their own typed states: encode_prompt -> text embeds,
        prepare_latents -> latents, sampling -> denoise.Sampling, denoise -> latents,
        decode -> Pixels (or Frames).
        """
        timer = StageTimer(self.device)

        def stage(name: str):
            if control.should_stop():
                raise Cancelled(f"cancelled before {name}")
            return timer.stage(name)

        with stage("encode_prompt"):
            cond = self.encode_prompt([r.prompt for r in requests], requests)
            uncond = None
            if self.uses_negative_prompt(requests[0]):
                uncond = self.encode_prompt([r.negative_prompt or "" for r in requests], requests)
        with stage("prepare_latents"):
            latents = self.prepare_latents(requests)
        with stage("timesteps"):
            sampling = self.sampling(latents, requests)
            if not all(r.cache for r in requests):  # some requests opted out of step caching
                sampling = replace(sampling, cache=tuple(r.cache for r in requests for _ in range(r.num_images)))
        with stage("denoise"):
            latents = self.denoise(latents, cond, uncond, sampling, requests, control, timer)
        with stage("decode"):
            pixels = self.decode(latents)
        return pixels, timer.timings

    def uses_negative_prompt(self, req: GenerationRequest) -> bool:
        """Whether the run needs the negative prompt's embeddings (true CFG as diffusers decides)."""
        return req.do_true_cfg
