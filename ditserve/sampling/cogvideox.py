"""CogVideoX's own samplers: the DDIM and the stochastic second-order DPM step of
`CogVideoXDDIMScheduler` / `CogVideoXDPMScheduler`, and the strict reading of their configs.

The noise schedule is a beta schedule whose alpha-bars are shifted by `snr_shift_scale`
(a/(s + (1 - s)a): the SNR divided by s) and, with `rescale_betas_zero_snr`, rescaled to end at
zero SNR; the model predicts v (or epsilon, or the sample). Timesteps are integers spaced as
`timestep_spacing` says; each step goes from t to t - T // N (diffusers' rule, whatever the spacing).

Reproduces diffusers step for step in the same arithmetic: the coefficients are 0-d tensors in the
schedule's dtype (float64 for scaled_linear betas), so float32 results are bit-equal.

The DPM step is stochastic: it draws noise of the latents' shape from the request's generator at
every step (twice on the steps that use the previous prediction, the first draw discarded), as
diffusers' pipelines pass it their generator. The generators are per run: `CogVideoXDPM.for_run`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ditserve.sampling.solver import Schedule

DDIM, DPM = "CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"
SAMPLER_OF = {DDIM: "ddim", DPM: "dpm"}
HONOURED, HARMLESS = "honoured", "harmless"
# both classes take the same parameters
KEYS: dict[str, str] = {
    "num_train_timesteps": HONOURED, "beta_start": HONOURED, "beta_end": HONOURED, "beta_schedule": HONOURED,
    "trained_betas": HONOURED, "set_alpha_to_one": HONOURED, "steps_offset": HONOURED,
    "prediction_type": HONOURED, "timestep_spacing": HONOURED, "rescale_betas_zero_snr": HONOURED,
    "snr_shift_scale": HONOURED,
    # read only by clipping and thresholding, which neither class's step does
    "clip_sample": HARMLESS, "clip_sample_range": HARMLESS, "sample_max_value": HARMLESS,
}


@dataclass(frozen=True)
class CogVideoXSchedule:
    """A config of either class (they share it)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.0120
    beta_schedule: str = "scaled_linear"
    trained_betas: tuple[float, ...] | None = None
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    rescale_betas_zero_snr: bool = False
    snr_shift_scale: float = 3.0

    def alphas_cumprod(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shifted (and rescaled) alpha-bars [T] and the final alpha-bar, as diffusers builds them."""
        n = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = torch.tensor(self.trained_betas, dtype=torch.float32)
        elif self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float32)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n, dtype=torch.float64) ** 2
        else:  # squaredcos_cap_v2
            def bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = torch.tensor([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)],
                                 dtype=torch.float32)
        ac = torch.cumprod(1.0 - betas, dim=0)
        s = self.snr_shift_scale
        ac = ac / (s + (1 - s) * ac)
        if self.rescale_betas_zero_snr:
            root = ac.sqrt()
            first, last = root[0].clone(), root[-1].clone()
            root = (root - last) * (first / (first - last))
            ac = root**2
        final = torch.tensor(1.0) if self.set_alpha_to_one else ac[0]
        return ac, final

    def timesteps(self, num_steps: int) -> np.ndarray:
        """Integer timesteps, highest first, as `set_timesteps` spaces them."""
        n = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, n - 1, num_steps).round()[::-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = n // num_steps
            return (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64) + self.steps_offset
        return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1  # trailing


@dataclass(frozen=True)
class StepCoefficients:
    """Per step i: alpha-bar at t_i, at the step's target t_i - T // N (the final alpha-bar below 0),
    and at t_{i-1} (None at i = 0); whether the target is below 0."""

    now: tuple[torch.Tensor, ...]
    target: tuple[torch.Tensor, ...]
    back: tuple[torch.Tensor | None, ...]
    last: tuple[bool, ...]


def coefficients(cfg: CogVideoXSchedule, timesteps: np.ndarray) -> StepCoefficients:
    ac, final = cfg.alphas_cumprod()
    jump = cfg.num_train_timesteps // len(timesteps)
    now, target, back, last = [], [], [], []
    for i, t in enumerate(timesteps.tolist()):
        prev = t - jump
        now.append(ac[t])
        target.append(ac[prev] if prev >= 0 else final)
        back.append(ac[timesteps[i - 1]] if i > 0 else None)
        last.append(prev < 0)
    return StepCoefficients(tuple(now), tuple(target), tuple(back), tuple(last))


def schedule(cfg: CogVideoXSchedule, num_steps: int) -> Schedule:
    """Timesteps as the model sees them; `sigmas` the noise level sqrt(1 - alpha-bar) at each step
    and at the end (informative: the solvers step in alpha-bars)."""
    if not 1 <= num_steps <= cfg.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be between 1 and {cfg.num_train_timesteps}, got {num_steps}")
    ts = cfg.timesteps(num_steps)
    c = coefficients(cfg, ts)
    sigmas = torch.stack([(1 - a) ** 0.5 for a in c.now] + [(1 - c.target[-1]) ** 0.5]).float()
    return Schedule(sigmas, torch.from_numpy(ts).float())


def predicted_sample(cfg: CogVideoXSchedule, x: torch.Tensor, out: torch.Tensor, a_t: torch.Tensor) -> torch.Tensor:
    b_t = 1 - a_t
    if cfg.prediction_type == "epsilon":
        return (x - b_t ** (0.5) * out) / a_t ** (0.5)
    if cfg.prediction_type == "sample":
        return out
    return (a_t**0.5) * x - (b_t**0.5) * out  # v_prediction


@dataclass(frozen=True)
class DDIMState:
    coef: StepCoefficients


@dataclass(frozen=True)
class CogVideoXDDIM:
    """Deterministic DDIM (eta 0) over the CogVideoX schedule."""

    cfg: CogVideoXSchedule
    name: str = "ddim"

    def schedule(self, num_steps: int, image_seq_len: int = 0) -> Schedule:
        return schedule(self.cfg, num_steps)

    def init(self, sched: Schedule) -> DDIMState:
        return DDIMState(coefficients(self.cfg, sched.timesteps.cpu().numpy().astype(np.int64)))

    def step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, state: DDIMState):
        a_t, a_prev = state.coef.now[i], state.coef.target[i]
        x0 = predicted_sample(self.cfg, x, model_out, a_t)
        a = ((1 - a_prev) / (1 - a_t)) ** 0.5
        b = a_prev**0.5 - a_t**0.5 * a
        return a * x + b * x0, state


@dataclass
class RequestNoise:
    """This run's noise: each request's CPU generator (already past its initial-noise draw) and its
    number of videos; a draw is one `randn` per request of (videos, *shape), concatenated."""

    generators: list[torch.Generator]
    counts: list[int]

    def draw(self, like: torch.Tensor) -> torch.Tensor:
        shape = like.shape[1:]
        parts = [torch.randn((n, *shape), generator=g, dtype=like.dtype) for g, n in zip(self.generators, self.counts)]
        return torch.cat(parts).to(like.device)


@dataclass(frozen=True)
class DPMState:
    coef: StepCoefficients
    previous: torch.Tensor | None = None  # the last step's predicted sample


@dataclass(frozen=True)
class CogVideoXDPM:
    """CogVideoX's DPM step: a stochastic first-order step, second order (with the previous predicted
    sample) from the second step on, except into the end. `noise` is the run's generators (built per
    run by `for_run`; without it the solver cannot step)."""

    cfg: CogVideoXSchedule
    noise: RequestNoise | None = field(default=None, compare=False)
    name: str = "dpm"

    def for_run(self, noise: RequestNoise) -> CogVideoXDPM:
        return CogVideoXDPM(self.cfg, noise)

    def schedule(self, num_steps: int, image_seq_len: int = 0) -> Schedule:
        return schedule(self.cfg, num_steps)

    def init(self, sched: Schedule) -> DPMState:
        if self.noise is None:
            raise ValueError("the CogVideoX DPM solver draws noise: build it with for_run(noise)")
        return DPMState(coefficients(self.cfg, sched.timesteps.cpu().numpy().astype(np.int64)))

    def step(self, x: torch.Tensor, model_out: torch.Tensor, i: int, state: DPMState):
        c = state.coef
        a_t, a_prev, a_back = c.now[i], c.target[i], c.back[i]
        x0 = predicted_sample(self.cfg, x, model_out, a_t)
        lamb = ((a_t / (1 - a_t)) ** 0.5).log()
        h = ((a_prev / (1 - a_prev)) ** 0.5).log() - lamb
        mult1 = ((1 - a_prev) / (1 - a_t)) ** 0.5 * (-h).exp()
        mult2 = (-2 * h).expm1() * a_prev**0.5
        mult_noise = (1 - a_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        x_next = mult1 * x - mult2 * x0 + mult_noise * self.noise.draw(x)
        if state.previous is not None and not c.last[i]:
            r = (lamb - ((a_back / (1 - a_back)) ** 0.5).log()) / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * state.previous
            x_next = mult1 * x - mult2 * denoised + mult_noise * self.noise.draw(x)
        return x_next, DPMState(c, x0)


# -- reading a folder's config -------------------------------------------------------------------


def _one_of(*values):
    return lambda v: any(type(v) is type(w) and v == w for w in values)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _flag(v) -> bool:
    return isinstance(v, bool)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _offset(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _betas(v) -> bool:
    return v is None or (isinstance(v, list) and bool(v) and all(map(_number, v)))


RULES = {
    "num_train_timesteps": (1000, _count), "beta_start": (0.00085, _number), "beta_end": (0.0120, _number),
    "beta_schedule": ("scaled_linear", _one_of("linear", "scaled_linear", "squaredcos_cap_v2")),
    "trained_betas": (None, _betas), "set_alpha_to_one": (True, _flag), "steps_offset": (0, _offset),
    "prediction_type": ("epsilon", _one_of("epsilon", "sample", "v_prediction")),
    "timestep_spacing": ("leading", _one_of("linspace", "leading", "trailing")),
    "rescale_betas_zero_snr": (False, _flag), "snr_shift_scale": (3.0, lambda v: _number(v) and v > 0),
}


@dataclass(frozen=True)
class CogVideoXSchedulerSpec:
    """A CogVideoX folder's scheduler (the `read_scheduler_config` answer for these classes): its
    solver; no sampler or shift overrides (the pipelines refuse them before any work)."""

    class_name: str
    default_sampler: str
    cfg: CogVideoXSchedule

    def solver(self, sampler: str | None = None, flow_shift: float | None = None):
        if sampler not in (None, self.default_sampler) or flow_shift is not None:
            raise ValueError("CogVideoX folders run their own scheduler: sampler and flow_shift overrides "
                             "are not supported")
        return CogVideoXDDIM(self.cfg) if self.class_name == DDIM else CogVideoXDPM(self.cfg)


def read_cogvideox_scheduler(file: str, class_name: str, raw: dict) -> CogVideoXSchedulerSpec:
    """`raw` (a scheduler_config.json of `class_name`) as a spec; ValueError naming a bad key in one line.
    Keys that are not parameters of the class are ignored, as diffusers ignores them."""
    values = {}
    for key, (default, ok) in RULES.items():
        value = raw.get(key, default)
        if not ok(value):
            raise ValueError(f"{file}: {key}={json.dumps(value)} is not supported by ditserve's {class_name}")
        values[key] = tuple(value) if isinstance(value, list) else value
    cfg = CogVideoXSchedule(**values)
    if cfg.trained_betas is not None and len(cfg.trained_betas) != cfg.num_train_timesteps:
        raise ValueError(f"{file}: trained_betas has {len(cfg.trained_betas)} values for "
                         f"num_train_timesteps={cfg.num_train_timesteps}")
    return CogVideoXSchedulerSpec(class_name, SAMPLER_OF[class_name], cfg)
