"""A folder's `scheduler/scheduler_config.json`, read strictly, and the solvers it (or a request's
override) asks for.

`_class_name` picks the solver. Every `__init__` parameter of that diffusers class is listed below as
honoured (read into our config), harmless (cannot change the result as the pipelines drive it; the
comment says why) or `Must(value)` — anything else is refused with one line naming key and value,
before weights load. Keys that are not `__init__` parameters are ignored, as diffusers ignores them.
A unit test checks these lists against the installed diffusers' signatures.

Overrides per request (`--sampler`, `--flow-shift`, as SGLang Diffusion and diffusers users set them):
- `sampler` equal to the folder's (or None): the folder's scheduler exactly.
- another `sampler`: that solver with diffusers' defaults for its own knobs (order, type, final-step
  rules) and the folder's noise schedule: `num_train_timesteps`; the shift (a flow-match folder's
  `shift` becomes `flow_shift`, a multistep folder's `flow_shift` becomes Euler's `shift`); FLUX's
  dynamic shifting with the folder's mu rule (to UniPC as its time shift, to DPM-Solver++ as
  `flow_shift = e^mu` as diffusers' `set_timesteps(mu=...)` does, or `mu` for a linear time shift);
  `shift_terminal` (Euler and UniPC; DPM-Solver++ has none). Euler from a multistep folder spaces its
  sigmas as the scheduler itself does (the pipelines using those folders pass no sigmas); UniPC and
  DPM-Solver++ always use their own flow-sigma grids (diffusers' FLUX pipeline drops its sigmas for
  them too; its Qwen-Image pipeline would pass them to UniPC, which we do not follow).
- `flow_shift`: a static shift replacing the folder's; dynamic shifting, where configured, is then off
  (the request's number is the shift used, at every image size); a terminal stretch stays.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ditserve.api.request import SAMPLERS
from ditserve.sampling.dpm import DPMConfig, DPMSolverPP, beta_sigma_min
from ditserve.sampling.flow_match import FlowMatchConfig, FlowMatchEuler
from ditserve.sampling.solver import Solver
from ditserve.sampling.unipc import UniPC, UniPCConfig

__all__ = ["SAMPLERS", "SchedulerSpec", "UnsupportedScheduler", "read_scheduler_config"]


class UnsupportedScheduler(ValueError):
    """A scheduler config (or override) ditserve cannot honour; the message is one line."""


@dataclass(frozen=True)
class Must:
    """The only value accepted (diffusers' default unless `why` says otherwise)."""

    value: object
    why: str = ""


HONOURED, HARMLESS = "honoured", "harmless"
EULER, UNIPC, DPM = "FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler"
SAMPLER_OF = {EULER: "euler", UNIPC: "unipc", DPM: "dpm++"}
SOLVER_NAME = {EULER: "flow-match Euler", UNIPC: "UniPC", DPM: "DPM-Solver++"}
_FLOW = "ditserve runs flow matching only"

KEYS: dict[str, dict[str, object]] = {
    EULER: {
        "num_train_timesteps": HONOURED, "shift": HONOURED, "use_dynamic_shifting": HONOURED,
        "base_shift": HONOURED, "max_shift": HONOURED, "base_image_seq_len": HONOURED,
        "max_image_seq_len": HONOURED,  # the pipelines' mu rule reads these four from the config
        "invert_sigmas": Must(False), "shift_terminal": HONOURED, "use_karras_sigmas": Must(False),
        "use_exponential_sigmas": Must(False), "use_beta_sigmas": Must(False), "time_shift_type": HONOURED,
        "stochastic_sampling": Must(False, "its noise comes from a generator the pipelines never pass"),
    },
    UNIPC: {
        "num_train_timesteps": HONOURED, "solver_order": HONOURED, "solver_type": HONOURED,
        "lower_order_final": HONOURED, "disable_corrector": HONOURED, "final_sigmas_type": HONOURED,
        "flow_shift": HONOURED, "shift_terminal": HONOURED,
        # the betas only build alphas_cumprod, which flow sigmas never read
        "beta_start": HARMLESS, "beta_end": HARMLESS, "beta_schedule": HARMLESS, "trained_betas": HARMLESS,
        "rescale_betas_zero_snr": HARMLESS,
        # the timesteps these make are replaced by sigma * T under flow sigmas
        "timestep_spacing": HARMLESS, "steps_offset": HARMLESS,
        # read only by thresholding (refused) and by the karras/exponential/beta sigmas (refused)
        "dynamic_thresholding_ratio": HARMLESS, "sample_max_value": HARMLESS, "sigma_min": HARMLESS,
        "sigma_max": HARMLESS,
        # read only with use_dynamic_shifting (refused)
        "time_shift_type": HARMLESS,
        "prediction_type": Must("flow_prediction", _FLOW), "use_flow_sigmas": Must(True, _FLOW),
        "predict_x0": Must(True, "diffusers cannot run it with flow_prediction either"),
        "thresholding": Must(False), "solver_p": Must(None), "use_karras_sigmas": Must(False),
        "use_exponential_sigmas": Must(False), "use_beta_sigmas": Must(False),
        "use_dynamic_shifting": Must(False, "a UniPC config has no rule for mu"),
    },
    DPM: {
        "num_train_timesteps": HONOURED, "solver_order": HONOURED, "solver_type": HONOURED,
        "lower_order_final": HONOURED, "euler_at_final": HONOURED, "flow_shift": HONOURED,
        "final_sigmas_type": HONOURED, "algorithm_type": HONOURED,
        # honoured for final_sigmas_type "sigma_min" (the last sigma comes from the betas); else unread
        "beta_start": HONOURED, "beta_end": HONOURED, "beta_schedule": HONOURED, "trained_betas": HONOURED,
        "rescale_betas_zero_snr": HONOURED,
        # these shape timesteps that flow sigmas replace by sigma * T
        "timestep_spacing": HARMLESS, "steps_offset": HARMLESS, "lambda_min_clipped": HARMLESS,
        # read only for epsilon predictions, by thresholding (refused) and with a mu (refused)
        "variance_type": HARMLESS, "dynamic_thresholding_ratio": HARMLESS, "sample_max_value": HARMLESS,
        "time_shift_type": HARMLESS,
        "prediction_type": Must("flow_prediction", _FLOW), "use_flow_sigmas": Must(True, _FLOW),
        "thresholding": Must(False), "use_karras_sigmas": Must(False), "use_exponential_sigmas": Must(False),
        "use_beta_sigmas": Must(False), "use_lu_lambdas": Must(False),
        "use_dynamic_shifting": Must(False, "a DPM config has no rule for mu"),
    },
}


@dataclass(frozen=True)
class SchedulerSpec:
    """The folder's scheduler as one of our solver configs (exactly one is set), and how a request's
    overrides rebuild it (see the module docstring)."""

    class_name: str
    default_sampler: str
    euler: FlowMatchConfig | None = None
    unipc: UniPCConfig | None = None
    dpm: DPMConfig | None = None

    def solver(self, sampler: str | None = None, flow_shift: float | None = None) -> Solver:
        """The folder's solver, or `sampler` built from its noise schedule; `flow_shift` replaces the shift."""
        sampler = self.default_sampler if sampler is None else sampler
        if sampler not in SAMPLERS:
            raise UnsupportedScheduler(f"sampler must be one of {', '.join(SAMPLERS)}; got {sampler!r}")
        if flow_shift is not None and not _positive(flow_shift):
            raise UnsupportedScheduler(f"flow_shift must be a finite number > 0; got {flow_shift!r}")
        if sampler == self.default_sampler:
            euler, unipc, dpm = self.euler, self.unipc, self.dpm
        else:
            euler, unipc, dpm = self._carried(sampler)
        if euler is not None:
            static = {} if flow_shift is None else dict(shift=flow_shift, use_dynamic_shifting=False)
            return FlowMatchEuler(replace(euler, **static))
        static = {} if flow_shift is None else dict(flow_shift=flow_shift, dynamic=None)
        return UniPC(replace(unipc, **static)) if unipc is not None else DPMSolverPP(replace(dpm, **static))

    def _carried(self, sampler: str):
        """Configs for `sampler` with diffusers' defaults and this folder's noise schedule."""
        if self.euler is not None:
            e = self.euler
            steps, shift, dynamic, terminal = e.num_train_timesteps, e.shift, e.dynamic, e.shift_terminal
        else:
            c = self.unipc or self.dpm
            steps, shift, dynamic = c.num_train_timesteps, c.flow_shift, None
            terminal = self.unipc.shift_terminal if self.unipc is not None else None
        if sampler == "euler":  # only from a multistep folder, whose pipelines pass no sigmas
            return FlowMatchConfig(steps, shift, shift_terminal=terminal, spacing="scheduler"), None, None
        if sampler == "unipc":
            return None, UniPCConfig(steps, flow_shift=shift, shift_terminal=terminal, dynamic=dynamic), None
        return None, None, DPMConfig(steps, flow_shift=shift, dynamic=dynamic)


def read_scheduler_config(path: Path) -> SchedulerSpec:
    """The folder's scheduler config (the JSON file at `path`) as a SchedulerSpec; UnsupportedScheduler
    with a one-line message when it asks for math ditserve does not implement."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UnsupportedScheduler(f"{path.name}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise UnsupportedScheduler(f"{path.name}: must hold a JSON object")
    name = raw.get("_class_name")
    if name in ("CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"):  # their own solvers: sampling/cogvideox.py
        from ditserve.sampling.cogvideox import read_cogvideox_scheduler

        try:
            return read_cogvideox_scheduler(path.name, name, raw)
        except ValueError as exc:
            raise UnsupportedScheduler(str(exc)) from None
    if not isinstance(name, str) or name not in KEYS:
        raise UnsupportedScheduler(f"{path.name}: scheduler {json.dumps(name)} is not supported; "
                                   f"ditserve runs {', '.join(KEYS)}")
    r = _Reader(path.name, name, {k: v for k, v in raw.items() if k in KEYS[name]})
    for key, rule in KEYS[name].items():
        if isinstance(rule, Must) and key in r.raw and not _same(r.raw[key], rule.value):
            raise r.refuse(key, rule.why)
    if name == EULER:
        return SchedulerSpec(name, "euler", euler=_euler(r))
    _check_harmless(r)
    if name == UNIPC:
        return SchedulerSpec(name, "unipc", unipc=_unipc(r))
    return SchedulerSpec(name, "dpm++", dpm=_dpm(r))


@dataclass(frozen=True)
class _Reader:
    file: str
    cls: str
    raw: dict

    def refuse(self, key: str, why: str = "", value=None) -> UnsupportedScheduler:
        value = json.dumps(self.raw.get(key, value))
        return UnsupportedScheduler(f"{self.file}: {key}={value} is not supported by ditserve's "
                                    f"{SOLVER_NAME[self.cls]}" + (f" ({why})" if why else ""))

    def get(self, key: str, default, ok, why: str = ""):
        value = self.raw.get(key, default)
        if not ok(value):
            raise self.refuse(key, why, value)
        return value


def _same(value, want) -> bool:
    return value is want if isinstance(want, bool) or want is None else value == want


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v) -> bool:
    return _number(v) and v > 0


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _flag(v) -> bool:
    return isinstance(v, bool)


def _one_of(*values):
    return lambda v: any(type(v) is type(want) and v == want for want in values)


def _terminal(v) -> bool:  # None or 0 is off; 1 would divide by zero
    return v is None or (_number(v) and 0 <= v < 1)


def _euler(r: _Reader) -> FlowMatchConfig:
    dynamic = r.get("use_dynamic_shifting", False, _flag)
    # the mu rule is read only with dynamic shifting; diffusers' pipelines fail on a null there
    rule = _number if dynamic else (lambda v: v is None or _number(v))
    cfg = FlowMatchConfig(
        num_train_timesteps=r.get("num_train_timesteps", 1000, _count),
        shift=r.get("shift", 1.0, _positive),
        use_dynamic_shifting=dynamic,
        base_shift=r.get("base_shift", 0.5, rule), max_shift=r.get("max_shift", 1.15, rule),
        base_image_seq_len=r.get("base_image_seq_len", 256, rule),
        max_image_seq_len=r.get("max_image_seq_len", 4096, rule),
        shift_terminal=r.get("shift_terminal", None, _terminal),
        time_shift_type=r.get("time_shift_type", "exponential", _one_of("exponential", "linear")),
    )
    if dynamic and cfg.max_image_seq_len == cfg.base_image_seq_len:
        raise r.refuse("max_image_seq_len", "equal to base_image_seq_len, mu is 0/0", cfg.max_image_seq_len)
    return cfg


def _check_harmless(r: _Reader) -> None:
    """Values diffusers itself rejects, in keys that are otherwise unread under flow sigmas."""
    r.get("timestep_spacing", "linspace", _one_of("linspace", "leading", "trailing"))
    betas = r.get("trained_betas", None, lambda v: v is None or (isinstance(v, list) and v and all(map(_number, v))))
    if betas is None:
        r.get("beta_schedule", "linear", _one_of("linear", "scaled_linear", "squaredcos_cap_v2"))


def _unipc(r: _Reader) -> UniPCConfig:
    # diffusers maps the DPM solver types onto bh2
    kind = r.get("solver_type", "bh2", _one_of("bh1", "bh2", "midpoint", "heun", "logrho"))
    cfg = UniPCConfig(
        num_train_timesteps=r.get("num_train_timesteps", 1000, _count),
        solver_order=r.get("solver_order", 2, _one_of(1, 2, 3)),
        solver_type="bh1" if kind == "bh1" else "bh2",
        lower_order_final=r.get("lower_order_final", True, _flag),
        disable_corrector=tuple(r.get("disable_corrector", [], lambda v: isinstance(v, list) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in v))),
        final_sigmas_type=r.get("final_sigmas_type", "zero", _one_of("zero", "sigma_min")),
        flow_shift=r.get("flow_shift", 1.0, _positive),
        shift_terminal=r.get("shift_terminal", None, _terminal),
    )
    # the last step at full order is not finite in diffusers: into sigma 0 h is infinite, and
    # sigma_min's last step has h = 0, which order 3's linear solve cannot take (order 2 fixes rho)
    if not cfg.lower_order_final and cfg.solver_order > (1 if cfg.final_sigmas_type == "zero" else 2):
        raise r.refuse("lower_order_final", f"with solver_order {cfg.solver_order} and final_sigmas_type "
                                            f"{cfg.final_sigmas_type}: diffusers' last step is not finite")
    return cfg


def _dpm(r: _Reader) -> DPMConfig:
    algorithm = r.get("algorithm_type", "dpmsolver++", _one_of("dpmsolver++", "deis", "sde-dpmsolver++",
                                                                "dpmsolver", "sde-dpmsolver"))
    if algorithm == "sde-dpmsolver++":
        raise r.refuse("algorithm_type", "its noise comes from a generator the pipelines never pass")
    if algorithm not in ("dpmsolver++", "deis"):  # diffusers maps deis onto dpmsolver++
        raise r.refuse("algorithm_type", "diffusers cannot run it with flow_prediction either")
    steps = r.get("num_train_timesteps", 1000, _count)
    final, final_type = 0.0, r.get("final_sigmas_type", "zero", _one_of("zero", "sigma_min"))
    if algorithm == "deis" and final_type == "zero":
        raise r.refuse("algorithm_type", 'with final_sigmas_type "zero": diffusers refuses it too')
    if final_type == "sigma_min":
        r.get("rescale_betas_zero_snr", False, lambda v: v is False, 'with final_sigmas_type "sigma_min"')
        final = beta_sigma_min(steps, r.get("beta_start", 0.0001, _positive), r.get("beta_end", 0.02, _positive),
                               r.raw.get("beta_schedule", "linear"), r.raw.get("trained_betas"))
    kind = r.get("solver_type", "midpoint", _one_of("midpoint", "heun", "logrho", "bh1", "bh2"))
    return DPMConfig(
        num_train_timesteps=steps,
        solver_order=r.get("solver_order", 2, _one_of(1, 2, 3)),
        solver_type="heun" if kind == "heun" else "midpoint",  # diffusers maps the others onto midpoint
        lower_order_final=r.get("lower_order_final", True, _flag),
        euler_at_final=r.get("euler_at_final", False, _flag),
        flow_shift=r.get("flow_shift", 1.0, _positive),
        final_sigma=final,
    )
