"""Flow-matching Euler, reproducing diffusers' FlowMatchEulerDiscreteScheduler as the FLUX and
Qwen-Image pipelines drive it (they pass `linspace(1, 1/N, N)` as sigmas).

`FlowMatchEuler` follows the solver protocol (sampling/solver.py); `schedule` and `euler_step` are
the pure pieces it is made of.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ditserve.sampling.solver import Schedule


@dataclass(frozen=True)
class FlowMatchConfig:
    """The fields of diffusers' `scheduler_config.json` that shape a flow-match schedule."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift_terminal: float | None = None
    time_shift_type: str = "exponential"
    # where the unshifted sigmas come from: "pipeline" = linspace(1, 1/N, N), as the FLUX and
    # Qwen-Image pipelines pass them; "scheduler" = the scheduler's own spacing between its
    # (shifted) training sigmas, as a pipeline that passes none gets (Wan with an Euler scheduler)
    spacing: str = "pipeline"

    @classmethod
    def from_json(cls, path: str | Path) -> "FlowMatchConfig":
        """A flow-match Euler folder's config, read strictly (sampling/scheduler_config.py)."""
        from ditserve.sampling.scheduler_config import UnsupportedScheduler, read_scheduler_config

        spec = read_scheduler_config(path)
        if spec.euler is None:
            raise UnsupportedScheduler(f"{spec.class_name} is not a flow-match Euler scheduler")
        return spec.euler


def dynamic_shift_mu(image_seq_len: int, cfg: FlowMatchConfig) -> float:
    """Linear interpolation of the shift `mu` in the image sequence length (FLUX's rule)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


def schedule(num_steps: int, image_seq_len: int, cfg: FlowMatchConfig) -> Schedule:
    """Sigmas and timesteps for `num_steps` Euler steps, as the diffusers pipelines compute them.

    The pipelines pass `linspace(1, 1/N, N)` as sigmas; the scheduler then shifts them
    (static `shift`, or dynamic with `mu` from the image sequence length), optionally stretches
    them to end at `shift_terminal`, and appends a final 0.
    """
    sigmas = base_sigmas(num_steps, cfg)
    if cfg.use_dynamic_shifting:
        sigmas = time_shift(cfg.time_shift_type, dynamic_shift_mu(image_seq_len, cfg), sigmas)
    else:
        sigmas = cfg.shift * sigmas / (1 + (cfg.shift - 1) * sigmas)
    if cfg.shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    sig = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    timesteps = sig * cfg.num_train_timesteps
    return Schedule(sigmas=torch.cat([sig, torch.zeros(1)]), timesteps=timesteps)


def base_sigmas(num_steps: int, cfg: FlowMatchConfig) -> np.ndarray:
    """The unshifted sigmas the schedule starts from (see FlowMatchConfig.spacing)."""
    if cfg.spacing == "pipeline":
        return np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    t = cfg.num_train_timesteps
    train = torch.from_numpy(np.linspace(1, t, t, dtype=np.float32)[::-1].copy()) / t
    if not cfg.use_dynamic_shifting:
        train = cfg.shift * train / (1 + (cfg.shift - 1) * train)
    return np.linspace(train[0].item() * t, train[-1].item() * t, num_steps) / t


def time_shift(kind: str, mu: float, t: np.ndarray) -> np.ndarray:
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / t - 1) ** 1.0)
    raise ValueError(f"unknown time_shift_type {kind!r}")


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """x_{next} = x + (sigma_next - sigma) * v, computed in float32, returned in v's dtype."""
    dt = sigma_next - sigma
    return (x.to(torch.float32) + dt * velocity).to(velocity.dtype)


@dataclass(frozen=True)
class EulerState:
    sigmas: torch.Tensor


@dataclass(frozen=True)
class FlowMatchEuler:
    """First-order flow-match solver: x += (sigma_next - sigma) * v."""

    cfg: FlowMatchConfig
    name: str = "euler"

    def schedule(self, num_steps: int, image_seq_len: int = 0) -> Schedule:
        return schedule(num_steps, image_seq_len, self.cfg)

    def init(self, sched: Schedule) -> EulerState:
        return EulerState(sched.sigmas)

    def step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, state: EulerState):
        return euler_step(x, model_out, state.sigmas[i], state.sigmas[i + 1]), state
