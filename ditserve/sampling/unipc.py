"""UniPC multistep with flow sigmas (what Wan ships): a predictor of order up to 3 and a corrector
that refines each new sample with the model output at it, on the log-SNR grid lambda = log(alpha/sigma)
with alpha = 1 - sigma for flow matching.

Reproduces diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
predict_x0=True) step for step, in the same arithmetic (so float32 results are bit-equal): the model's
velocity becomes an x0 prediction, the history of x0 predictions is per-run state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ditserve.sampling.flow_match import time_shift
from ditserve.sampling.solver import Schedule


@dataclass(frozen=True)
class UniPCConfig:
    num_train_timesteps: int = 1000
    solver_order: int = 2
    solver_type: str = "bh2"  # bh1 | bh2
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    final_sigmas_type: str = "zero"  # zero | sigma_min
    flow_shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None


@dataclass(frozen=True)
class UniPCState:
    sigmas: torch.Tensor
    outputs: tuple[torch.Tensor, ...] = ()  # x0 predictions of the last steps, oldest first
    last_sample: torch.Tensor | None = None
    lower_order_nums: int = 0
    this_order: int = 0


def flow_sigmas(num_steps: int, cfg, mu: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Shifted flow sigmas [N] (float64) and integer timesteps [N], as diffusers' multistep
    schedulers make them from `linspace(1, 1/T, N + 1)[:-1]`."""
    t = cfg.num_train_timesteps
    sigmas = np.linspace(1, 1 / t, num_steps + 1)[:-1]
    if cfg.use_dynamic_shifting:
        sigmas = time_shift(cfg.time_shift_type, mu, sigmas)
    else:
        sigmas = cfg.flow_shift * sigmas / (1 + (cfg.flow_shift - 1) * sigmas)
    if cfg.shift_terminal:
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - cfg.shift_terminal))
    if abs(sigmas[0] - 1) < 1e-6:  # keeps log(sigma) and log(1 - sigma) finite at the first step
        sigmas[0] -= 1e-6
    return sigmas, (sigmas * t).astype(np.int64)


def flow_schedule(num_steps: int, cfg, mu: float | None = None) -> Schedule:
    sigmas, timesteps = flow_sigmas(num_steps, cfg, mu)
    last = 0.0 if cfg.final_sigmas_type == "zero" else sigmas[-1]
    sig = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
    return Schedule(sig, torch.from_numpy(timesteps).float())


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


def _coefficients(h: torch.Tensor, rks: torch.Tensor, order: int, solver_type: str):
    """UniPC's B(h), the phi_1 term and the right-hand side b of its order conditions."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, h_phi_1, torch.stack(rows), torch.stack(b)


def _update(x, m0, history, sig, i_t: int, i_s: int, order: int, solver_type: str, corrector_out=None):
    """One predictor (or, with `corrector_out`, corrector) update from sigma[i_s] to sigma[i_t];
    `history` are the older x0 predictions (newest first) at sigma[i_s - 1], sigma[i_s - 2], ..."""
    sigma_t, sigma_s0 = sig[i_t], sig[i_s]
    alpha_t = 1 - sigma_t
    lambda_s0 = _lambda(sigma_s0)
    h = _lambda(sigma_t) - lambda_s0
    rks, d1s = [], []
    for k, mk in enumerate(history[: order - 1], start=1):
        rk = (_lambda(sig[i_s - k]) - lambda_s0) / h
        rks.append(rk)
        d1s.append((mk - m0) / rk)
    rks.append(torch.ones((), device=x.device))
    b_h, h_phi_1, rows, b = _coefficients(h, torch.stack(rks), order, solver_type)
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    d1s = torch.stack(d1s, dim=1) if d1s else None
    if corrector_out is None:
        if d1s is None:
            return x_t.to(x.dtype)
        rhos = (torch.ones(1, dtype=x.dtype, device=x.device) * 0.5 if order == 2
                else torch.linalg.solve(rows[:-1, :-1], b[:-1]).to(x.device).to(x.dtype))
        return (x_t - alpha_t * b_h * torch.einsum("k,bkc...->bc...", rhos, d1s)).to(x.dtype)
    rhos = (torch.ones(1, dtype=x.dtype, device=x.device) * 0.5 if order == 1
            else torch.linalg.solve(rows, b).to(x.device).to(x.dtype))
    res = 0 if d1s is None else torch.einsum("k,bkc...->bc...", rhos[:-1], d1s)
    return (x_t - alpha_t * b_h * (res + rhos[-1] * (corrector_out - m0))).to(x.dtype)


@dataclass(frozen=True)
class UniPC:
    """The solver protocol over UniPCConfig (flow sigmas, x0 prediction)."""

    cfg: UniPCConfig
    name: str = "unipc"
    mu_fn: object = None  # image_seq_len -> mu, when the schedule is shifted dynamically

    def schedule(self, num_steps: int, image_seq_len: int = 0) -> Schedule:
        mu = self.mu_fn(image_seq_len) if self.cfg.use_dynamic_shifting else None
        return flow_schedule(num_steps, self.cfg, mu)

    def init(self, sched: Schedule) -> UniPCState:
        return UniPCState(sched.sigmas)

    def step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, state: UniPCState):
        cfg, sig = self.cfg, state.sigmas
        x0 = x - sig[i] * model_out
        sample = x
        if i > 0 and (i - 1) not in cfg.disable_corrector and state.last_sample is not None:
            history = state.outputs[::-1]  # newest first: the previous step's x0 leads
            sample = _update(state.last_sample, history[0], history[1:], sig, i, i - 1, state.this_order,
                             cfg.solver_type, corrector_out=x0)
        outputs = (state.outputs + (x0,))[-cfg.solver_order:]
        total = len(sig) - 1
        order = min(cfg.solver_order, total - i) if cfg.lower_order_final else cfg.solver_order
        order = min(order, state.lower_order_nums + 1)
        history = outputs[::-1]
        x_next = _update(sample, history[0], history[1:], sig, i + 1, i, order, cfg.solver_type)
        return x_next, UniPCState(sig, outputs, sample, min(state.lower_order_nums + 1, cfg.solver_order), order)
