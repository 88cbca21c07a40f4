"""The solver protocol of the denoising core: pure objects, per-request state.

    solver = FlowMatchEuler(cfg)                        # frozen: only its config
    sched = solver.schedule(num_steps, image_seq_len)   # sigmas and model timesteps
    state = solver.init(sched)                          # this run's state
    x, state = solver.step(x, model_out, i, state)      # one step; nothing shared is mutated

A solver never mutates itself or a state it was given, so one solver serves concurrent and batched
requests (diffusers' schedulers keep step state on the scheduler object and cannot).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Schedule:
    """`sigmas` [N + 1] float32, ending at the final sigma (usually 0); `timesteps` [N]: the value
    the model is conditioned on at step i, in training units (0..num_train_timesteps)."""

    sigmas: torch.Tensor
    timesteps: torch.Tensor

    def __len__(self) -> int:
        return len(self.timesteps)

    def to(self, device) -> "Schedule":
        return Schedule(self.sigmas.to(device), self.timesteps.to(device))


class Solver(Protocol):
    """`name` is what `--sampler` calls it (euler, unipc, dpm++)."""

    name: str

    def schedule(self, num_steps: int, image_seq_len: int = 0) -> Schedule:
        """The schedule for `num_steps` steps; `image_seq_len` feeds dynamic shifting (FLUX's mu)."""
        ...

    def init(self, schedule: Schedule) -> Any:
        """Fresh per-run state for `schedule` (already on the latents' device)."""
        ...

    def step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, state: Any) -> tuple[torch.Tensor, Any]:
        """Advance x from step i to i + 1 given the model's (guided) prediction at step i."""
        ...
