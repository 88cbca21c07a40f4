"""`ditserve.Generator`: load once, generate many times, in this process."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

from ditserve import demo
from ditserve.api import GenerationOutput, GenerationRequest, InvalidRequest
from ditserve.config import AccelConfig, EngineConfig, ModelConfig, ParallelConfig
from ditserve.config.engine import CacheConfig
from ditserve.config.memory import MemoryConfig, memory_config
from ditserve.pipelines.base import RunControl
from ditserve.runtime.engine import Engine

log = logging.getLogger(__name__)


class Generator:
    """Python entry point.

    >>> gen = Generator.from_pretrained()  # the bundled 64x64 demo model, as `ditserve generate` uses
    >>> video = Generator.from_pretrained("ditserve-demo-video")  # the bundled video demo (17 frames)
    >>> gen = Generator.from_pretrained("path/to/FLUX.1-dev", device="cuda", dtype="bfloat16")
    >>> out = gen.generate(prompt="a red fox in snow", seed=0)
    >>> out.images[0].save("fox.png"); out.timings.stages
    """

    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def from_pretrained(cls, model: str | Path | None = None, device: str | None = None, dtype=None, *,
                        enable_torch_compile: bool = False, quantization: str | None = None,
                        cache: dict | str | None = None, parallel: dict | ParallelConfig | None = None,
                        cpu_offload: str = "none", memory: dict | MemoryConfig | None = None) -> "Generator":
        """`model` is a diffusers directory or a Hugging Face id (default: $DITSERVE_DEFAULT_MODEL, else
        the bundled demo model, `ditserve.demo.MODEL_DIR`), or a bundled demo's name: "ditserve-demo"
        (images) or "ditserve-demo-video" (the video demo, `ditserve.demo.VIDEO_MODEL_DIR`); `dtype` a
        name or torch dtype.

        `cache`: step caching, keys as the `--cache-*` flags (e.g. `dict(method="first-block",
        threshold=0.08, taylorseer_order=1)`); `parallel`: the parallel engine, keys as ParallelConfig's
        (e.g. `dict(num_gpus=2, ulysses_degree=2)`) — then call `close()` (or use `with`) to stop the ranks.
        `cpu_offload`: "none", "model" or "layerwise" (as `--cpu-offload`); `memory`: MemoryConfig's other keys
        (e.g. `dict(gpu_memory_budget_gib=12, text_encoder_device="cpu", vae_tiling="on", vae_slicing=True,
        forward_chunk_size=4096)`).
        """
        accel = AccelConfig(compile=enable_torch_compile, quantization=quantization,
                            cache=CacheConfig.from_mapping(cache))
        if isinstance(parallel, dict):
            unknown = sorted(set(parallel) - {f.name for f in fields(ParallelConfig)})
            if unknown:
                raise InvalidRequest(f"unknown parallel key(s) {', '.join(map(str, unknown))}; use "
                                     f"{', '.join(f.name for f in fields(ParallelConfig))}", "parallel")
            parallel = ParallelConfig(**parallel)
        path = demo.default_model(model)
        memory = memory_config(cpu_offload, memory)
        return cls(Engine.from_config(EngineConfig(ModelConfig(path, device, dtype), accel=accel,
                                                   parallel=parallel or ParallelConfig(), memory=memory)))

    def close(self) -> None:
        """Stop the parallel engine's ranks (nothing to do for one process)."""
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        true_cfg_scale: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        max_sequence_length: int | None = None,
        images: Sequence = (),
        num_frames: int | None = None,
        fps: int | None = None,
        guidance_scale_2: float | None = None,
        sampler: str | None = None,
        flow_shift: float | None = None,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float | None = None,
        skip_layer_guidance_start: float | None = None,
        skip_layer_guidance_stop: float | None = None,
        cache: bool = True,
        layers: int | None = None,
        use_dynamic_cfg: bool | None = None,
        progress_bar: bool = False,
    ) -> GenerationOutput:
        """Images (PIL) — or, for a video model, `videos` (uint8 [frames, H, W, 3]) — with the stage
        and step timings; unset arguments take the family's defaults.

        `images` (a PIL image or several) are the input of an image-editing model (e.g. Qwen-Image-Edit)
        or of an image-to-video model. `sampler` (euler, unipc, dpm++) and `flow_shift` override the folder's
        scheduler. `cache=False` computes every step in full when the generator runs a step cache.
        `skip_guidance_layers` (SD3, with guidance) turns on skip-layer guidance as diffusers has it.
        `layers` (Qwen-Image-Layered): how many RGBA layers the input image is split into; the output's
        `images` are those layers, layer after layer, for each of the `num_images`. `use_dynamic_cfg`
        (CogVideoX): guidance that grows over the run, as diffusers' argument of that name.
        """
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
            true_cfg_scale=true_cfg_scale, seed=seed, num_images=num_images,
            max_sequence_length=max_sequence_length,
            images=tuple(images) if isinstance(images, (list, tuple)) else (images,),
            num_frames=num_frames, fps=fps, guidance_scale_2=guidance_scale_2, sampler=sampler, flow_shift=flow_shift,
            cache=cache,
            skip_guidance_layers=None if skip_guidance_layers is None else tuple(skip_guidance_layers),
            skip_layer_guidance_scale=skip_layer_guidance_scale, skip_layer_guidance_start=skip_layer_guidance_start,
            skip_layer_guidance_stop=skip_layer_guidance_stop, layers=layers, use_dynamic_cfg=use_dynamic_cfg,
        )
        request = self.engine.resolve(request)
        warning = demo.warning_for(self.engine.source.path, request.prompt, request.height, request.width,
                                   request.num_frames)
        if warning:
            log.warning(warning)
        return self.engine.run_batch([request], RunControl(progress_bar=progress_bar))[0]
