"""Flow-matching Euler, reproducing diffusers' FlowMatchEulerDiscreteScheduler as the FLUX and
Qwen-Image pipelines drive it (they pass `linspace(1, 1/N, N)` as sigmas), and the sigma shifts every
flow solver shares (static shift, FLUX's dynamic shift, the terminal stretch).

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
class DynamicShift:
    """FLUX's shift rule: `mu` linear in the image sequence length (the pipelines' `calculate_shift`),
    applied as an exponential or linear time shift."""

    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def mu(self, image_seq_len: int) -> float:
        return dynamic_shift_mu(image_seq_len, self)

    def as_static_shift(self, image_seq_len: int) -> float:
        """The static shift s with s*t / (1 + (s-1)*t) equal to this time shift (DPM-Solver++ takes
        `mu` this way: `flow_shift = exp(mu)`)."""
        mu = self.mu(image_seq_len)
        return float(np.exp(mu)) if self.time_shift_type == "exponential" else mu


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
    def from_json(cls, path: str | Path) -> FlowMatchConfig:
        """A flow-match Euler folder's config, read strictly (sampling/scheduler_config.py)."""
        from ditserve.sampling.scheduler_config import (
            UnsupportedScheduler,
            read_scheduler_config,
        )

        spec = read_scheduler_config(Path(path))
        if spec.euler is None:
            raise UnsupportedScheduler(f"{Path(path).name}: {spec.class_name} is not a flow-match Euler scheduler")
        return spec.euler

    @property
    def dynamic(self) -> DynamicShift | None:
        if not self.use_dynamic_shifting:
            return None
        return DynamicShift(self.base_shift, self.max_shift, self.base_image_seq_len, self.max_image_seq_len,
                            self.time_shift_type)


def dynamic_shift_mu(image_seq_len: int, cfg: FlowMatchConfig | DynamicShift) -> float:
    """Linear interpolation of the shift `mu` in the image sequence length (FLUX's rule)."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return image_seq_len * m + b


def time_shift(kind: str, mu: float, t: np.ndarray) -> np.ndarray:
    """diffusers' time shift of sigmas `t` by `mu` (exponential: e^mu; linear: mu)."""
    t = np.asarray(t)
    # 1/t - 1 is infinite at t = 0, where the shifted sigma is 0: take that limit, warning-free
    odds = np.divide(1, t, out=np.full_like(t, np.inf), where=t != 0) - 1
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + odds)
    if kind == "linear":
        return mu / (mu + odds)
    raise ValueError(f"unknown time_shift_type {kind!r}")


def static_shift(shift: float, sigmas: np.ndarray) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def stretch_to_terminal(sigmas: np.ndarray, terminal: float | None) -> np.ndarray:
    """Stretch `1 - sigma` so the last sigma lands on `terminal` (diffusers' `shift_terminal`).

    The stretch scales `1 - sigma` and so keeps sigma = 1 where it is: when every sigma is 1 (a
    1-step schedule starting at 1) there is nothing to stretch, and the sigmas stay 1 (diffusers
    divides 0 by 0 there and returns NaN)."""
    if not terminal:  # None or 0: off, as in diffusers
        return sigmas
    one_minus = 1 - sigmas
    if one_minus[-1] == 0:
        return sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


def shift_sigmas(sigmas: np.ndarray, shift: float, dynamic: DynamicShift | None, image_seq_len: int,
                 terminal: float | None) -> np.ndarray:
    """The shift every flow scheduler applies: dynamic (FLUX's mu) or static, then the terminal stretch."""
    if dynamic is not None:
        sigmas = time_shift(dynamic.time_shift_type, dynamic.mu(image_seq_len), sigmas)
    else:
        sigmas = static_shift(shift, sigmas)
    return stretch_to_terminal(sigmas, terminal)


def schedule(num_steps: int, image_seq_len: int, cfg: FlowMatchConfig) -> Schedule:
    """Sigmas and timesteps for `num_steps` Euler steps, as the diffusers pipelines compute them.

    The unshifted sigmas (see `FlowMatchConfig.spacing`) are shifted (static `shift`, or dynamic with
    `mu` from the image sequence length), optionally stretched to end at `shift_terminal`, and a
    final 0 is appended.
    """
    sigmas = shift_sigmas(base_sigmas(num_steps, cfg), cfg.shift, cfg.dynamic, image_seq_len, cfg.shift_terminal)
    sig = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    timesteps = sig * cfg.num_train_timesteps
    return Schedule(sigmas=torch.cat([sig, torch.zeros(1)]), timesteps=timesteps)


def base_sigmas(num_steps: int, cfg: FlowMatchConfig) -> np.ndarray:
    """The unshifted sigmas the schedule starts from (see FlowMatchConfig.spacing)."""
    if cfg.spacing == "pipeline":
        return np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    # the scheduler's own spacing: evenly between its first and last training sigma, which diffusers
    # has already shifted once when the shift is static (and shifts again in set_timesteps)
    t = cfg.num_train_timesteps
    train = torch.from_numpy(np.linspace(1, t, t, dtype=np.float32)[::-1].copy()) / t
    if not cfg.use_dynamic_shifting:
        train = cfg.shift * train / (1 + (cfg.shift - 1) * train)
    return np.linspace(train[0].item() * t, train[-1].item() * t, num_steps) / t


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
