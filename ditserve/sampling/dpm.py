"""DPM-Solver++ multistep with flow sigmas (an alternative Wan users pick): exponential-integrator steps
of order 1-3 on the x0 predictions, over lambda = log((1 - sigma) / sigma).

Reproduces diffusers' DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
algorithm_type="dpmsolver++") step for step in the same arithmetic and dtypes (float32 results are
bit-equal): the update runs in float32 and returns in the model output's dtype; the last x0
predictions are per-run state. The stochastic variant (sde-dpmsolver++) is not offered: its noise
comes from a generator the pipelines never pass, so no seed reproduces it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ditserve.sampling.flow_match import DynamicShift, static_shift
from ditserve.sampling.solver import Schedule


@dataclass(frozen=True)
class DPMConfig:
    num_train_timesteps: int = 1000
    solver_order: int = 2  # 1-3
    solver_type: str = "midpoint"  # midpoint | heun (how the second-order step uses the history)
    lower_order_final: bool = True  # below 15 steps, the last two steps drop to orders 1 and 2
    euler_at_final: bool = False  # the last step is first order
    flow_shift: float = 1.0
    # the last sigma: 0 (final_sigmas_type "zero"), or the beta schedule's first sigma ("sigma_min";
    # see beta_sigma_min: diffusers takes it from the betas even with flow sigmas)
    final_sigma: float = 0.0
    dynamic: DynamicShift | None = None  # FLUX's mu rule (flow_shift = e^mu), when set from a flow-match folder


@dataclass(frozen=True)
class DPMState:
    sigmas: torch.Tensor
    outputs: tuple[torch.Tensor, ...] = ()  # x0 predictions of the last steps, oldest first


def beta_sigma_min(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                   beta_schedule: str = "linear", trained_betas=None) -> float:
    """sqrt((1 - a0) / a0) of the first training step's alpha_bar, in float32 as diffusers builds it."""
    if trained_betas is not None:
        beta0 = torch.tensor(trained_betas, dtype=torch.float32)[0]
    elif beta_schedule == "linear":
        beta0 = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)[0]
    elif beta_schedule == "scaled_linear":
        beta0 = (torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2)[0]
    elif beta_schedule == "squaredcos_cap_v2":
        def alpha_bar(t: float) -> float:  # the cosine schedule of Nichol & Dhariwal
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        beta0 = torch.tensor([min(1 - alpha_bar(1 / num_train_timesteps) / alpha_bar(0), 0.999)],
                             dtype=torch.float32)[0]
    else:
        raise ValueError(f"unknown beta_schedule {beta_schedule!r}")
    alpha0 = 1.0 - beta0
    return float(((1 - alpha0) / alpha0) ** 0.5)


def dpm_flow_schedule(num_steps: int, cfg: DPMConfig, image_seq_len: int = 0) -> Schedule:
    """diffusers' flow sigmas for this solver: shifted `1 - linspace(1, 1/T, N + 1)`, reversed, the
    trailing 0 dropped, then the final sigma; timesteps truncated to integers."""
    t = cfg.num_train_timesteps
    shift = cfg.flow_shift if cfg.dynamic is None else cfg.dynamic.as_static_shift(image_seq_len)
    sigmas = 1.0 - np.linspace(1, 1 / t, num_steps + 1)
    sigmas = np.flip(static_shift(shift, sigmas))[:-1].copy()
    timesteps = (sigmas * t).astype(np.int64)
    sig = torch.from_numpy(np.concatenate([sigmas, [cfg.final_sigma]]).astype(np.float32))
    return Schedule(sig, torch.from_numpy(timesteps).float())


def step_order(cfg: DPMConfig, i: int, num_steps: int) -> int:
    """Warm up from order 1; near the end, drop as diffusers does (always first order into sigma 0)."""
    last = i == num_steps - 1 and (cfg.euler_at_final or (cfg.lower_order_final and num_steps < 15)
                                   or cfg.final_sigma == 0)
    second_last = i == num_steps - 2 and cfg.lower_order_final and num_steps < 15
    if cfg.solver_order == 1 or i < 1 or last:
        return 1
    if cfg.solver_order == 2 or i < 2 or second_last:
        return 2
    return 3


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def update(sample: torch.Tensor, outputs: tuple, sig: torch.Tensor, i: int, order: int, solver_type: str):
    """The order-`order` DPM-Solver++ step from sigma[i] to sigma[i + 1]; `outputs` oldest first."""
    sigma_t, sigma_s0 = sig[i + 1], sig[i]
    alpha_t = 1 - sigma_t
    h = _lambda(sigma_t) - _lambda(sigma_s0)
    phi = alpha_t * (torch.exp(-h) - 1.0)
    m0 = outputs[-1]
    x_t = (sigma_t / sigma_s0) * sample - phi * m0
    if order == 1:
        return x_t
    m1 = outputs[-2]
    r0 = (_lambda(sig[i]) - _lambda(sig[i - 1])) / h
    d1_0 = (1.0 / r0) * (m0 - m1)
    if order == 2 and solver_type == "midpoint":
        return x_t - 0.5 * phi * d1_0
    phi_2 = alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)
    if order == 2:
        return x_t + phi_2 * d1_0
    m2 = outputs[-3]
    r1 = (_lambda(sig[i - 1]) - _lambda(sig[i - 2])) / h
    d1_1 = (1.0 / r1) * (m1 - m2)
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
    return x_t + phi_2 * d1 - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * d2


@dataclass(frozen=True)
class DPMSolverPP:
    """The solver protocol over DPMConfig (flow sigmas, x0 prediction)."""

    cfg: DPMConfig
    name: str = "dpm++"

    def schedule(self, num_steps: int, image_seq_len: int = 0) -> Schedule:
        return dpm_flow_schedule(num_steps, self.cfg, image_seq_len)

    def init(self, sched: Schedule) -> DPMState:
        return DPMState(sched.sigmas)

    def step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, state: DPMState):
        cfg, sig = self.cfg, state.sigmas
        x0 = x - sig[i] * model_out
        outputs = (state.outputs + (x0,))[-cfg.solver_order:]
        order = step_order(cfg, i, len(sig) - 1)
        x_next = update(x.to(torch.float32), outputs, sig, i, order, cfg.solver_type).to(x0.dtype)
        return x_next, DPMState(sig, outputs)
