"""The engine: validates requests against the loaded model and runs batches through its pipeline.

In-process and synchronous here; the server puts it inside a worker process behind a queue.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from PIL import Image

from ditserve.accel import accelerate_dit, cache_dit
from ditserve.accel.offload import apply_memory, check_memory, load_device, offload_accel
from ditserve.api import Cancelled, EngineError, GenerationOutput, GenerationRequest, InvalidRequest
from ditserve.config import EngineConfig, parse_device, parse_dtype
from ditserve.models.common.loading import pinned_loading
from ditserve.pipelines.base import Frames, Pipeline, RunControl
from ditserve.runtime.loader import ModelSource, inspect_model, load_pipeline

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, pipeline: Pipeline, source: ModelSource):
        self.pipeline = pipeline
        self.source = source
        self.load_timings: dict[str, float] | None = None  # how the start went (from_config)
        self._report_load = False  # the next run's Timings carry load_timings

    @classmethod
    def from_config(cls, cfg: EngineConfig, source: ModelSource | None = None,
                    warmup: list[GenerationRequest] | None = None, groups=None) -> "Engine":
        """Load the model, apply the speed transforms and, when compiling, warm up on `warmup`
        (default: the model's default size at batch 1 and at `cfg.max_batch_size`).

        With several GPUs (`cfg.parallel`), this starts the ranks and returns a ParallelEngine that
        drives them (runtime/executor.py); each rank builds its own Engine with its `groups`."""
        check_memory(cfg.memory, cfg.parallel.enabled)
        if cfg.parallel.enabled and groups is None:
            from ditserve.runtime.executor import ParallelEngine

            return ParallelEngine.start(cfg, source)
        device = groups.device if groups is not None else torch.device(parse_device(cfg.model.device))
        dtype = parse_dtype(cfg.model.dtype, device.type)
        source = source or inspect_model(cfg.model.path)
        accel, where = offload_accel(cfg.accel, cfg.memory), load_device(cfg.memory, device)  # offload: host
        start = time.perf_counter()
        if groups is None:
            # CPU offload on a GPU: the DiTs read straight into the pinned memory they will stream from
            with pinned_loading(cfg.memory.offload and device.type == "cuda"):
                pipeline = load_pipeline(source, where, dtype)
        else:
            from ditserve import parallel

            with parallel.loading(groups):
                pipeline = load_pipeline(source, where, dtype)
        loaded = time.perf_counter()
        for name in pipeline.dit_names:  # every DiT the pipeline holds (both experts of Wan 2.2 A14B)
            if getattr(pipeline, name, None) is not None:
                setattr(pipeline, name, accelerate_dit(getattr(pipeline, name), accel, device))
        if groups is not None:
            parallel.parallelize_pipeline(pipeline, groups, cfg.parallel.vae_parallel)
        for name in pipeline.dit_names:
            if getattr(pipeline, name, None) is not None:
                setattr(pipeline, name, cache_dit(getattr(pipeline, name), accel, device, groups))
        apply_memory(pipeline, cfg.memory, device)  # offload, text-encoder device, VAE tiling
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        engine = cls(pipeline, source)
        ready = time.perf_counter()
        if cfg.accel.compile:
            engine.warmup(warmup or engine.default_warmups(cfg.max_batch_size))
        done = time.perf_counter()
        engine.load_timings = {"weights": loaded - start, "setup": ready - loaded, "warmup": done - ready,
                               "total": done - start}
        engine._report_load = True
        return engine

    def default_warmups(self, max_batch_size: int) -> list[GenerationRequest]:
        """The default size at batch 1 and at the largest batch the server forms: compiled code and
        CUDA graphs are specialised per shape, so each shape met later would compile again."""
        defaults = self.source.defaults  # edit models need input images: grey ones at the default size
        images = (Image.new("RGB", (defaults.width, defaults.height), (128, 128, 128)),) * self.source.limits.min_images
        batches = sorted({1, max(1, min(max_batch_size, self.source.limits.max_num_images))})
        return [GenerationRequest(prompt="warm-up", seed=0, images=images, num_images=n) for n in batches]

    def warmup(self, requests: list[GenerationRequest]) -> None:
        """Two-step generations at each request's shape: compilation and graph capture happen here."""
        start = time.perf_counter()
        for request in requests:
            self.generate(replace(request, num_inference_steps=2, seed=0))
        log.info("warm-up of %d shape(s) done in %.1f s", len(requests), time.perf_counter() - start)

    def resolve(self, request: GenerationRequest) -> GenerationRequest:
        """Fill the model's defaults and validate; raises InvalidRequest before any model work."""
        return request.resolve(self.source.defaults, self.source.limits)

    def run_batch(self, requests: list[GenerationRequest], control: RunControl | None = None) -> list[GenerationOutput]:
        """Run resolved, batch-compatible requests as one pipeline call; one output per request."""
        keys = {self.pipeline.batch_key(r) for r in requests}
        if len(keys) != 1:
            raise InvalidRequest("requests in one batch must share size, steps and guidance mode")
        try:
            pixels, timings = self.pipeline.run(requests, control or RunControl())
            if self._report_load:
                timings.load, self._report_load = dict(self.load_timings), False
        except (Cancelled, InvalidRequest):
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise EngineError(f"out of GPU memory: {exc}") from exc
        outputs, start = [], 0
        for req in requests:
            n = req.num_images
            if isinstance(pixels, Frames):
                videos = list(pixels.videos[start:start + n])
                outputs.append(GenerationOutput(images=[], videos=videos, fps=req.fps, timings=timings, seed=req.seed))
            else:
                n *= pixels.per_image
                images = [Image.fromarray(a) for a in pixels.images[start:start + n]]  # RGB or RGBA
                outputs.append(GenerationOutput(images=images, timings=timings, seed=req.seed))
            start += n
        return outputs

    def generate(self, request: GenerationRequest, control: RunControl | None = None) -> GenerationOutput:
        return self.run_batch([self.resolve(request)], control)[0]
