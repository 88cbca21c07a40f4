"""UniPC multistep with flow sigmas (what Wan ships): a predictor of order up to 3 and a corrector
that refines each new sample with the model output at it, on the log-SNR grid
lambda = log(alpha / sigma) with alpha = 1 - sigma.

Reproduces diffusers' UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
predict_x0=True) step for step in the same arithmetic and dtypes (float32 results are bit-equal): the
velocity becomes an x0 prediction, and the last x0 predictions and the last sample are per-run state.
Like diffusers, the math runs in the sample's dtype (bfloat16 stays bfloat16) with float32 sigmas.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ditserve.sampling.flow_match import DynamicShift, shift_sigmas
from ditserve.sampling.solver import Schedule


@dataclass(frozen=True)
class UniPCConfig:
    num_train_timesteps: int = 1000
    solver_order: int = 2  # 1-3
    solver_type: str = "bh2"  # bh1 | bh2: B(h) = h or e^h - 1
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()  # steps whose result is not corrected
    final_sigmas_type: str = "zero"  # zero | sigma_min (the last step then stays at the last sigma)
    flow_shift: float = 1.0
    shift_terminal: float | None = None
    dynamic: DynamicShift | None = None  # FLUX's mu rule, when set from a flow-match folder


@dataclass(frozen=True)
class UniPCState:
    sigmas: torch.Tensor
    outputs: tuple[torch.Tensor, ...] = ()  # x0 predictions of the last steps, oldest first
    last_sample: torch.Tensor | None = None  # the (corrected) sample the last predictor started from


def flow_sigmas(num_steps: int, cfg: UniPCConfig, image_seq_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Shifted flow sigmas [N] (float64) and integer timesteps [N] from `linspace(1, 1/T, N + 1)[:-1]`,
    UniPC's own grid (the pipelines that use it pass no sigmas)."""
    t = cfg.num_train_timesteps
    sigmas = np.linspace(1, 1 / t, num_steps + 1)[:-1]
    sigmas = shift_sigmas(sigmas, cfg.flow_shift, cfg.dynamic, image_seq_len, cfg.shift_terminal)
    if abs(sigmas[0] - 1) < 1e-6:  # keeps log(sigma) and log(1 - sigma) finite at the first step
        sigmas[0] -= 1e-6
    # the model is conditioned on the truncated integer timestep; the solver uses the exact sigma
    return sigmas, (sigmas * t).astype(np.int64)


def flow_schedule(num_steps: int, cfg: UniPCConfig, image_seq_len: int = 0) -> Schedule:
    sigmas, timesteps = flow_sigmas(num_steps, cfg, image_seq_len)
    last = 0.0 if cfg.final_sigmas_type == "zero" else sigmas[-1]
    sig = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
    return Schedule(sig, torch.from_numpy(timesteps).float())


def step_order(cfg: UniPCConfig, i: int, num_steps: int) -> int:
    """The predictor's order at step i: warm up from 1, and (lower_order_final) drop near the end."""
    order = min(cfg.solver_order, num_steps - i) if cfg.lower_order_final else cfg.solver_order
    return min(order, i + 1)


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    return torch.log(1 - sigma) - torch.log(sigma)


@dataclass(frozen=True)
class _Terms:
    """What predictor and corrector share for an update from sigma[s] to sigma[t]."""

    x_t: torch.Tensor  # the first-order (DDIM-like) part
    scale: torch.Tensor  # alpha_t * B(h): multiplies the higher-order residual
    rows: torch.Tensor  # r_k^(i-1), the order conditions' matrix
    b: torch.Tensor  # their right-hand side
    d1s: torch.Tensor | None  # (m_k - m0) / r_k, stacked on dim 1


def _terms(x, m0, history, sig, t: int, s: int, order: int, solver_type: str) -> _Terms:
    """`history`: older x0 predictions (newest first) at sigma[s - 1], sigma[s - 2], ..."""
    sigma_t, sigma_s0 = sig[t], sig[s]
    alpha_t = 1 - sigma_t
    lambda_s0 = _lambda(sigma_s0)
    h = _lambda(sigma_t) - lambda_s0
    rks, d1s = [], []
    for k, mk in enumerate(history[: order - 1], start=1):
        rk = (_lambda(sig[s - k]) - lambda_s0) / h
        rks.append(rk)
        d1s.append((mk - m0) / rk)
    rks.append(torch.ones((), device=x.device))
    rks = torch.stack(rks)
    hh = -h  # x0 prediction
    h_phi_1 = torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    rows, b, factorial = [], [], 1
    for i in range(1, order + 1):
        rows.append(torch.pow(rks, i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    x_t = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    return _Terms(x_t, alpha_t * b_h, torch.stack(rows), torch.stack(b),
                  torch.stack(d1s, dim=1) if d1s else None)


def _mix(rhos: torch.Tensor, d1s: torch.Tensor) -> torch.Tensor:
    return torch.einsum("k,bkc...->bc...", rhos, d1s)


def predict(x, m0, history, sig, i: int, order: int, solver_type: str) -> torch.Tensor:
    """UniPC's predictor from sigma[i] to sigma[i + 1] (x0 prediction, B(h) variant `solver_type`)."""
    tm = _terms(x, m0, history, sig, i + 1, i, order, solver_type)
    if tm.d1s is None:
        # diffusers subtracts scale * 0 here, which is NaN for bh1 into sigma 0 (B(h) = -inf); the
        # first-order step needs no residual, so the result is equal wherever diffusers' is finite
        return tm.x_t.to(x.dtype)
    if order == 2:
        rhos = torch.ones(1, dtype=x.dtype, device=x.device) * 0.5
    else:
        rhos = torch.linalg.solve(tm.rows[:-1, :-1], tm.b[:-1]).to(x.device).to(x.dtype)
    return (tm.x_t - tm.scale * _mix(rhos, tm.d1s)).to(x.dtype)


def correct(last, m0, history, model_t, sig, i: int, order: int, solver_type: str) -> torch.Tensor:
    """UniPC's corrector: redo the update from sigma[i - 1] to sigma[i] with the x0 prediction
    `model_t` at sigma[i]; `order` is the predictor order used for that update."""
    tm = _terms(last, m0, history, sig, i, i - 1, order, solver_type)
    if order == 1:
        rhos = torch.ones(1, dtype=last.dtype, device=last.device) * 0.5
    else:
        rhos = torch.linalg.solve(tm.rows, tm.b).to(last.device).to(last.dtype)
    res = rhos[-1] * (model_t - m0)
    if tm.d1s is not None:
        res = _mix(rhos[:-1], tm.d1s) + res
    return (tm.x_t - tm.scale * res).to(last.dtype)


@dataclass(frozen=True)
class UniPC:
    """The solver protocol over UniPCConfig (flow sigmas, x0 prediction)."""

    cfg: UniPCConfig
    name: str = "unipc"

    def schedule(self, num_steps: int, image_seq_len: int = 0) -> Schedule:
        return flow_schedule(num_steps, self.cfg, image_seq_len)

    def init(self, sched: Schedule) -> UniPCState:
        return UniPCState(sched.sigmas)

    def step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, state: UniPCState):
        cfg, sig = self.cfg, state.sigmas
        num_steps = len(sig) - 1
        x0 = x - sig[i] * model_out
        if i > 0 and i - 1 not in cfg.disable_corrector:
            newest_first = state.outputs[::-1]
            x = correct(state.last_sample, newest_first[0], newest_first[1:], x0, sig, i,
                        step_order(cfg, i - 1, num_steps), cfg.solver_type)
        outputs = (state.outputs + (x0,))[-cfg.solver_order:]
        newest_first = outputs[::-1]
        x_next = predict(x, newest_first[0], newest_first[1:], sig, i, step_order(cfg, i, num_steps), cfg.solver_type)
        return x_next, UniPCState(sig, outputs, x)
