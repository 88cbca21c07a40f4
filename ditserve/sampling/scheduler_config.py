"""A folder's `scheduler/scheduler_config.json`, read strictly, and the solvers it (or a request's
override) asks for.

`_class_name` picks the solver. Every `__init__` parameter of that diffusers class is, for the way
the pipelines drive it, either honoured, harmless (cannot change the result: listed with why), or
must keep diffusers' default — anything else is refused with one line naming key and value, before
weights load. Keys that are not `__init__` parameters are ignored, as diffusers ignores them.

Overrides per request (as SGLang Diffusion and diffusers users set them):
- `sampler`: euler | unipc | dpm++ builds that solver from the folder's shift: a flow-match folder's
  `shift` becomes the multistep solvers' `flow_shift`, a multistep folder's `flow_shift` becomes
  Euler's `shift` (Euler then spaces sigmas as the scheduler itself does, as a pipeline passing no
  sigmas gets); dynamic shifting carries over to Euler and UniPC, DPM-Solver++ takes the folder's
  static shift.
- `flow_shift`: a static shift replacing the folder's (dynamic shifting, where configured, is then off).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from ditserve.api.request import SAMPLERS
from ditserve.sampling.dpm import DPMConfig, DPMSolverPP
from ditserve.sampling.flow_match import FlowMatchConfig, FlowMatchEuler, dynamic_shift_mu
from ditserve.sampling.solver import Solver
from ditserve.sampling.unipc import UniPC, UniPCConfig


class UnsupportedScheduler(ValueError):
    """A scheduler config (or override) ditserve cannot honour; the message is one line."""


_EULER = "FlowMatchEulerDiscreteScheduler"
_UNIPC = "UniPCMultistepScheduler"
_DPM = "DPMSolverMultistepScheduler"
_SAMPLER_OF = {_EULER: "euler", _UNIPC: "unipc", _DPM: "dpm++"}

# honoured: read into our config
_HONOURED = {
    _EULER: ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len",
             "max_image_seq_len", "shift_terminal", "time_shift_type"),
    _UNIPC: ("num_train_timesteps", "solver_order", "solver_type", "lower_order_final", "disable_corrector",
             "final_sigmas_type", "flow_shift", "shift_terminal"),
    _DPM: ("num_train_timesteps", "solver_order", "solver_type", "lower_order_final", "euler_at_final", "flow_shift"),
}
# harmless with flow sigmas: the beta schedule only defines alphas_cumprod, which flow sigmas never
# read; timestep spacing and offset are replaced by the flow sigmas; thresholding's parameters only
# matter with thresholding on (refused below); sigma_min/max only with karras-type sigmas (refused)
_HARMLESS = ("beta_start", "beta_end", "beta_schedule", "trained_betas", "timestep_spacing", "steps_offset",
             "rescale_betas_zero_snr", "dynamic_thresholding_ratio", "sample_max_value", "sigma_min", "sigma_max",
             "lambda_min_clipped", "variance_type")
# must equal this value (diffusers' default, or what flow matching needs)
_REQUIRED = {
    _EULER: {"invert_sigmas": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
             "use_beta_sigmas": False, "stochastic_sampling": False},
    _UNIPC: {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "predict_x0": True, "thresholding": False,
             "solver_p": None, "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
             "use_dynamic_shifting": False, "time_shift_type": "exponential"},
    _DPM: {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "algorithm_type": "dpmsolver++",
           "final_sigmas_type": "zero", "thresholding": False, "use_karras_sigmas": False,
           "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
           "use_dynamic_shifting": False, "variance_type": None},
}


@dataclass(frozen=True)
class SchedulerSpec:
    """The folder's scheduler as one of our solver configs, and how overrides rebuild it."""

    class_name: str
    default_sampler: str
    euler: FlowMatchConfig | None = None
    unipc: UniPCConfig | None = None
    dpm: DPMConfig | None = None

    @property
    def num_train_timesteps(self) -> int:
        return (self.euler or self.unipc or self.dpm).num_train_timesteps

    @property
    def shift(self) -> float:
        return self.euler.shift if self.euler is not None else (self.unipc or self.dpm).flow_shift

    def solver(self, sampler: str | None = None, flow_shift: float | None = None) -> Solver:
        sampler = sampler or self.default_sampler
        if sampler not in SAMPLERS:
            raise UnsupportedScheduler(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        if flow_shift is not None and not (math.isfinite(flow_shift) and flow_shift > 0):
            raise UnsupportedScheduler(f"flow_shift must be a finite number > 0, got {flow_shift!r}")
        if sampler == "euler":
            cfg = self.euler or FlowMatchConfig(num_train_timesteps=self.num_train_timesteps, shift=self.shift,
                                                spacing="scheduler")
            if flow_shift is not None:
                cfg = replace(cfg, shift=flow_shift, use_dynamic_shifting=False)
            return FlowMatchEuler(cfg)
        if sampler == "dpm++":  # a static shift: the folder's, or the override
            cfg = self.dpm or DPMConfig(num_train_timesteps=self.num_train_timesteps, flow_shift=self.shift)
            return DPMSolverPP(replace(cfg, flow_shift=flow_shift) if flow_shift is not None else cfg)
        if self.unipc is not None or self.euler is None:
            cfg = self.unipc or UniPCConfig(num_train_timesteps=self.num_train_timesteps, flow_shift=self.shift)
            mu_fn = None
        else:  # from a flow-match folder: its shift, dynamic (FLUX's mu rule) or static
            e = self.euler
            cfg = UniPCConfig(num_train_timesteps=e.num_train_timesteps, flow_shift=e.shift,
                              use_dynamic_shifting=e.use_dynamic_shifting, time_shift_type=e.time_shift_type,
                              shift_terminal=e.shift_terminal)
            mu_fn = partial(dynamic_shift_mu, cfg=e)
        if flow_shift is not None:
            cfg = replace(cfg, flow_shift=flow_shift, use_dynamic_shifting=False)
        return UniPC(cfg, mu_fn=mu_fn)


def read_scheduler_config(path: str | Path) -> SchedulerSpec:
    """The folder's scheduler config as a SchedulerSpec; UnsupportedScheduler (one line) otherwise."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise UnsupportedScheduler("scheduler_config.json must hold a JSON object")
    name = raw.get("_class_name")
    if name not in _SAMPLER_OF:
        raise UnsupportedScheduler(f"scheduler {name!r} is not supported; ditserve runs "
                                   f"{', '.join(_SAMPLER_OF)}")
    for key, want in _REQUIRED[name].items():
        got = raw.get(key, want)
        if isinstance(want, bool) or want is None:
            same = (bool(got) == bool(want)) if want is not None else got is None
        else:
            same = got == want
        if not same:
            raise UnsupportedScheduler(f"{key}={json.dumps(got)} is not supported by ditserve's "
                                       f"{_SAMPLER_OF[name]} solver ({name})")
    given = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items()
             if k in _HONOURED[name] and v is not None}
    if name == _EULER:
        return SchedulerSpec(name, "euler", euler=FlowMatchConfig(**given))
    if name == _DPM:
        cfg = DPMConfig(**given)
        if cfg.solver_type not in ("midpoint", "heun") or not 1 <= cfg.solver_order <= 3:
            raise UnsupportedScheduler(f"solver_type={cfg.solver_type!r}, solver_order={cfg.solver_order} is not "
                                       "supported (midpoint or heun, orders 1-3)")
        return SchedulerSpec(name, "dpm++", dpm=cfg)
    cfg = UniPCConfig(**given)
    if cfg.solver_type not in ("bh1", "bh2") or not 1 <= cfg.solver_order <= 3:
        raise UnsupportedScheduler(f"solver_type={cfg.solver_type!r}, solver_order={cfg.solver_order} is not "
                                   "supported (bh1 or bh2, orders 1-3)")
    if cfg.final_sigmas_type not in ("zero", "sigma_min"):
        raise UnsupportedScheduler(f"final_sigmas_type={cfg.final_sigmas_type!r} is not supported")
    return SchedulerSpec(name, "unipc", unipc=cfg)
