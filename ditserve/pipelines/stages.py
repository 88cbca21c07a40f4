"""Stages shared by the flow-matching families: initial noise, 2x2 latent packing, the denoising loop."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ditserve.api import GenerationRequest
from ditserve.pipelines.base import Cancelled, RunControl, StageTimer
from ditserve.sampling.flow_match import Schedule, euler_step

log = logging.getLogger(__name__)

# velocity = predict(x, t) with t the batch's timesteps in [0, 1]
Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def initial_noise(requests: list[GenerationRequest], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """Noise drawn as diffusers draws it: one CPU generator per request, seeded with its seed,
    shape (num_images, *shape), in the pipeline dtype; then moved to the device."""
    draws = []
    for req in requests:
        gen = torch.Generator("cpu").manual_seed(req.seed)
        draws.append(torch.randn((req.num_images, *shape), generator=gen, dtype=dtype))
    return torch.cat(draws).to(device)


def pack(latents_BCHW: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents -> [B, (H/2)(W/2), 4C] tokens of 2x2 patches, row-major."""
    b, c, h, w = latents_BCHW.shape
    x = latents_BCHW.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x_BLC: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    (b, _, c), (h, w) = x_BLC.shape, grid
    x = x_BLC.view(b, h // 2, w // 2, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c // 4, h, w)


def repeat_per_image(t: torch.Tensor, requests: list[GenerationRequest]) -> torch.Tensor:
    """Per-request rows repeated for each request's images (num_images)."""
    counts = torch.tensor([r.num_images for r in requests], device=t.device)
    return t.repeat_interleave(counts, dim=0)


def denoise(
    x: torch.Tensor,
    schedule: Schedule,
    predict: Predictor,
    control: RunControl,
    timer: StageTimer,
) -> torch.Tensor:
    """Euler integration of the flow from sigma=1 to 0; per-step times go to the timer."""
    total = len(schedule)
    sigmas = schedule.sigmas.to(x.device)
    timesteps = schedule.timesteps.to(x.device)
    bar = tqdm(total=total, disable=not control.progress_bar, desc="denoise", leave=False)
    clock = timer.step_clock()
    for i in range(total):
        if control.should_stop():
            raise Cancelled(f"cancelled before step {i + 1}/{total}")
        t = timesteps[i].expand(x.shape[0]).to(x.dtype) / 1000
        x = euler_step(x, predict(x, t), sigmas[i], sigmas[i + 1])
        clock.tick()
        bar.update()
        control.on_step(i + 1, total)
    bar.close()
    steps = clock.durations()
    timer.timings.steps.extend(steps)
    log.info("denoise: %d steps, %.4f s/step", total, sum(steps) / total)
    return x
