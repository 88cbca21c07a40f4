"""Stages shared by the flow-matching families: initial noise and the denoising loop."""

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
