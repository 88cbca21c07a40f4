"""The one denoising loop every family runs.

    x = denoise(x, Sampling(schedule, solver, guidance, experts), model, control, timer)

Each step: pick the expert for the step's timestep, let the guidance turn model calls into one
prediction, let the solver advance x. `model(expert, x_in, t, ctx)` is the family's model call:
it builds the DiT inputs for the batch chunks `ctx.branches` and runs DiT number `expert`.
Per-run state — the solver's, and one `StepContext` state per (expert, branch) for caches and
parallel wrappers — lives in this call, never on a shared object.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ditserve.api.errors import Cancelled
from ditserve.api.output import CacheStats
from ditserve.models.common.dit import StepContext
from ditserve.pipelines.base import RunControl, StageTimer
from ditserve.sampling.guidance import ClassifierFree, NoGuidance
from ditserve.sampling.solver import Schedule, Solver

log = logging.getLogger(__name__)

# (expert, x_in, timesteps [B] in training units (float32), ctx) -> prediction shaped like x_in
ModelFn = Callable[[int, torch.Tensor, torch.Tensor, StepContext], torch.Tensor]
# (x, step index) -> x, applied after each solver step (e.g. re-imposing a conditioning frame)
AfterStep = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Experts:
    """Which DiT runs at each step. One expert by default; with `boundary` (in timestep units),
    expert 0 runs while t >= boundary and expert 1 below it (Wan 2.2 A14B: high-noise, then
    low-noise)."""

    boundary: float | None = None

    def pick(self, t: float) -> int:
        return 0 if self.boundary is None or t >= self.boundary else 1


@dataclass(frozen=True)
class Sampling:
    """Everything that decides the math of a run's steps."""

    schedule: Schedule
    solver: Solver
    guidance: NoGuidance | ClassifierFree = NoGuidance()
    experts: Experts = Experts()
    # per sample of a branch: may a step cache reuse work for it (None: all may; see accel/cache.py)
    cache: tuple[bool, ...] | None = None


def denoise(x: torch.Tensor, sampling: Sampling, model: ModelFn, control: RunControl, timer: StageTimer,
            after_step: AfterStep | None = None) -> torch.Tensor:
    """Integrate from the schedule's first sigma to its last; per-step times go to the timer."""
    sched = sampling.schedule
    total = len(sched)
    on_device = sched.to(x.device)
    state = sampling.solver.init(on_device)
    states: dict[tuple[int, str], dict] = {}
    bar = tqdm(total=total, disable=not control.progress_bar, desc="denoise", leave=False)
    clock = timer.step_clock()
    for i in range(total):
        if control.should_stop():
            raise Cancelled(f"cancelled before step {i + 1}/{total}")
        expert = sampling.experts.pick(float(sched.timesteps[i]))  # host copy: no device sync
        t = on_device.timesteps[i].float()

        def call(x_in: torch.Tensor, branches: Sequence[str]) -> torch.Tensor:
            ctx = StepContext(i, total, expert, tuple(branches),
                              tuple(states.setdefault((expert, b), {}) for b in branches), sampling.cache)
            return model(expert, x_in, t.expand(x_in.shape[0]), ctx)

        with torch.no_grad():
            pred = sampling.guidance.predict(call, x, expert)
            x, state = sampling.solver.step(x, pred, i, state)
            if after_step is not None:
                x = after_step(x, i)
        clock.tick()
        bar.update()
        control.on_step(i + 1, total)
    bar.close()
    steps = clock.durations()
    timer.timings.steps.extend(steps)
    timer.timings.cache = CacheStats.gather(states.values())
    log.info("denoise: %d steps, %.4f s/step", total, sum(steps) / max(total, 1))
    return x
