"""DPM-Solver++ multistep with flow sigmas (an alternative Wan users pick): exponential-integrator steps
of order 1-3 on the x0 predictions, over lambda = log((1 - sigma) / sigma).

Reproduces diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
algorithm_type="dpmsolver++") step for step, in the same arithmetic; the history of x0 predictions is
per-run state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ditserve.sampling.solver import Schedule


@dataclass(frozen=True)
class DPMConfig:
    num_train_timesteps: int = 1000
    solver_order: int = 2
    solver_type: str = "midpoint"  # midpoint | heun (second order)
    lower_order_final: bool = True
    euler_at_final: bool = False
    flow_shift: float = 1.0


@dataclass(frozen=True)
class DPMState:
    sigmas: torch.Tensor
    outputs: tuple[torch.Tensor, ...] = ()  # x0 predictions, oldest first
    lower_order_nums: int = 0


def dpm_flow_schedule(num_steps: int, cfg: DPMConfig) -> Schedule:
    """diffusers' flow sigmas for this solver: shifted `1 - linspace(1, 1/T, N + 1)`, reversed,
    the trailing 0 dropped, then a final sigma of 0; timesteps truncated to integers."""
    t = cfg.num_train_timesteps
    sigmas = 1.0 - np.linspace(1, 1 / t, num_steps + 1)
    sigmas = np.flip(cfg.flow_shift * sigmas / (1 + (cfg.flow_shift - 1) * sigmas))[:-1].copy()
    timesteps = (sigmas * t).astype(np.int64)
    sig = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return Schedule(sig, torch.from_numpy(timesteps).float())


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def _update(sample: torch.Tensor, outputs: tuple, sig: torch.Tensor, i: int, order: int, solver_type: str):
    """The order-`order` DPM-Solver++ step from sigma[i] to sigma[i + 1]."""
    sigma_t, sigma_s0 = sig[i + 1], sig[i]
    alpha_t = 1 - sigma_t
    h = _lambda(sigma_t) - _lambda(sigma_s0)
    m0 = outputs[-1]
    x_t = (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0
    if order == 1:
        return x_t
    m1 = outputs[-2]
    r0 = (_lambda(sig[i]) - _lambda(sig[i - 1])) / h
    d1_0 = (1.0 / r0) * (m0 - m1)
    if order == 2:
        if solver_type == "midpoint":
            return x_t - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1_0
        return x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1_0
    m2 = outputs[-3]
    r1 = (_lambda(sig[i - 1]) - _lambda(sig[i - 2])) / h
    d1_1 = (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return (x_t + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1
            - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2)


@dataclass(frozen=True)
class DPMSolverPP:
    """The solver protocol over DPMConfig (flow sigmas, x0 prediction, final sigma 0)."""

    cfg: DPMConfig
    name: str = "dpm++"

    def schedule(self, num_steps: int, image_seq_len: int = 0) -> Schedule:
        return dpm_flow_schedule(num_steps, self.cfg)

    def init(self, sched: Schedule) -> DPMState:
        return DPMState(sched.sigmas)

    def step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, state: DPMState):
        cfg, sig = self.cfg, state.sigmas
        total = len(sig) - 1
        # the final sigma is 0: the last step is always first order, as in diffusers
        final = i == total - 1
        second_last = i == total - 2 and cfg.lower_order_final and total < 15
        x0 = x - sig[i] * model_out
        outputs = (state.outputs + (x0,))[-cfg.solver_order:]
        n = state.lower_order_nums
        if cfg.solver_order == 1 or n < 1 or final:
            order = 1
        elif cfg.solver_order == 2 or n < 2 or second_last:
            order = 2
        else:
            order = 3
        x_next = _update(x.to(torch.float32), outputs, sig, i, order, cfg.solver_type).to(x0.dtype)
        return x_next, DPMState(sig, outputs, min(n + 1, cfg.solver_order))
