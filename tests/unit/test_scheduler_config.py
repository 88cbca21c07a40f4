"""Strict reading of scheduler_config.json: every diffusers __init__ parameter honoured, harmless or
refused in one line; the real folders accepted; per-request overrides as diffusers users get them."""

import inspect
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ditserve.sampling.dpm import DPMSolverPP
from ditserve.sampling.flow_match import FlowMatchConfig, FlowMatchEuler
from ditserve.sampling.scheduler_config import (
    HARMLESS,
    HONOURED,
    KEYS,
    SAMPLERS,
    Must,
    UnsupportedScheduler,
    read_scheduler_config,
)
from ditserve.sampling.unipc import UniPC

CLASSES = {c.__name__: c for c in (FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,
                                   DPMSolverMultistepScheduler)}
# the folders as they ship (FLUX.1-dev, FLUX.1-schnell, Qwen-Image, Wan2.1 T2V-1.3B, Wan2.2 as saved
# by diffusers 0.35 with every key written out)
FLUX_DEV = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0",
            "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
            "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
FLUX_SCHNELL = dict(FLUX_DEV, shift=1.0, use_dynamic_shifting=False)
QWEN_IMAGE = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.34.0.dev0",
              "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
              "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
              "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
              "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False}
WAN21 = {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.33.0.dev0", "beta_end": 0.02,
         "beta_schedule": "linear", "beta_start": 0.0001, "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
         "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": True, "num_train_timesteps": 1000,
         "predict_x0": True, "prediction_type": "flow_prediction", "rescale_betas_zero_snr": False,
         "sample_max_value": 1.0, "solver_order": 2, "solver_p": None, "solver_type": "bh2", "steps_offset": 0,
         "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None, "use_beta_sigmas": False,
         "use_exponential_sigmas": False, "use_flow_sigmas": True, "use_karras_sigmas": False}
WAN22 = dict(WAN21, _diffusers_version="0.35.0.dev0", flow_shift=5.0, sigma_max=None, sigma_min=None,
             shift_terminal=None, time_shift_type="exponential", use_dynamic_shifting=False)
DPM = {"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "flow_prediction", "use_flow_sigmas": True,
       "flow_shift": 3.0}


def write(tmp_path, config: dict):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config))
    return path


def read(tmp_path, config: dict):
    return read_scheduler_config(write(tmp_path, config))


def refused(tmp_path, config: dict, *named: str) -> str:
    with pytest.raises(UnsupportedScheduler) as info:
        read(tmp_path, config)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("scheduler_config.json: ")
    for part in named:
        assert part in msg, msg
    return msg


def init_kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.mark.parametrize("name", KEYS)
def test_key_lists_cover_the_installed_diffusers_signatures(name):
    """Drift check: every __init__ parameter of the installed class is classified, nothing else is, and
    every refused key's accepted value is diffusers' default (flow matching's two aside)."""
    params = inspect.signature(CLASSES[name].__init__).parameters
    assert set(KEYS[name]) == set(params) - {"self"}
    for key, rule in KEYS[name].items():
        assert rule in (HONOURED, HARMLESS) or isinstance(rule, Must)
        if isinstance(rule, Must) and key not in ("prediction_type", "use_flow_sigmas"):
            assert rule.value == params[key].default, key


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if value is None:
        return {"_class_name": "DDIMScheduler"}
    return "epsilon" if value == "flow_prediction" else True


REFUSED = [(name, key, rule.value) for name, keys in KEYS.items() for key, rule in keys.items() if isinstance(rule, Must)]
BASE = {"FlowMatchEulerDiscreteScheduler": FLUX_DEV, "UniPCMultistepScheduler": WAN21,
        "DPMSolverMultistepScheduler": DPM}
SOLVER = {"FlowMatchEulerDiscreteScheduler": "flow-match Euler", "UniPCMultistepScheduler": "UniPC",
          "DPMSolverMultistepScheduler": "DPM-Solver++"}


@pytest.mark.parametrize("name, key, value", REFUSED, ids=[f"{n[:5]}-{k}" for n, k, _ in REFUSED])
def test_every_refused_key_is_refused_in_one_line(tmp_path, name, key, value):
    bad = _other_value(value)
    msg = refused(tmp_path, {**BASE[name], key: bad}, f"{key}={json.dumps(bad)}", f"ditserve's {SOLVER[name]}")
    if key == "use_karras_sigmas" and name.startswith("Flow"):
        assert msg == "scheduler_config.json: use_karras_sigmas=true is not supported by ditserve's flow-match Euler"


@pytest.mark.parametrize("config, named", [
    (dict(WAN21, solver_order=4), "solver_order=4"), (dict(WAN21, solver_order=True), "solver_order=true"),
    (dict(WAN21, solver_order="2"), 'solver_order="2"'), (dict(WAN21, solver_type="bh3"), "solver_type"),
    (dict(WAN21, final_sigmas_type="denoise_to_zero"), "final_sigmas_type"), (dict(WAN21, flow_shift=0), "flow_shift=0"),
    (dict(WAN21, flow_shift=-3.0), "flow_shift=-3.0"), (dict(WAN21, disable_corrector=[0.5]), "disable_corrector"),
    (dict(WAN21, lower_order_final=False), "lower_order_final=false"),
    (dict(WAN21, lower_order_final=False, solver_order=3, final_sigmas_type="sigma_min"), "lower_order_final"),
    (dict(WAN21, shift_terminal=1.0), "shift_terminal=1.0"), (dict(WAN21, num_train_timesteps=0), "num_train_timesteps"),
    (dict(WAN21, timestep_spacing="karras"), "timestep_spacing"), (dict(WAN21, beta_schedule="cosine"), "beta_schedule"),
    (dict(DPM, algorithm_type="sde-dpmsolver++"), "algorithm_type"), (dict(DPM, algorithm_type="dpmsolver"), "algorithm_type"),
    (dict(DPM, solver_order=0), "solver_order"), (dict(DPM, solver_type="bh3"), "solver_type"),
    (dict(DPM, final_sigmas_type="sigma_min", rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
    (dict(FLUX_DEV, time_shift_type="quadratic"), "time_shift_type"), (dict(FLUX_DEV, shift=0.0), "shift=0.0"),
    (dict(FLUX_DEV, base_shift=None), "base_shift=null"), (dict(FLUX_DEV, max_image_seq_len=256), "max_image_seq_len=256"),
    (dict(FLUX_DEV, use_dynamic_shifting="yes"), "use_dynamic_shifting"),
])
def test_values_that_change_or_break_the_math_are_refused(tmp_path, config, named):
    refused(tmp_path, config, named)


@pytest.mark.parametrize("config", [{"_class_name": "DDIMScheduler"}, {"_class_name": "EulerDiscreteScheduler"},
                                    {"flow_shift": 3.0}, {"_class_name": None}, {"_class_name": ["UniPC"]}])
def test_unknown_scheduler_classes_are_refused(tmp_path, config):
    refused(tmp_path, config, "is not supported", json.dumps(config.get("_class_name")))


def test_files_that_are_not_json_objects_are_refused(tmp_path):
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(UnsupportedScheduler, match="not valid JSON"):
        read_scheduler_config(tmp_path / "scheduler_config.json")
    refused(tmp_path, [WAN21], "JSON object")


@pytest.mark.parametrize("config", [FLUX_DEV, FLUX_SCHNELL, QWEN_IMAGE, WAN21, WAN22, dict(WAN22, flow_shift=12.0)],
                         ids=["flux-dev", "flux-schnell", "qwen-image", "wan2.1", "wan2.2", "wan2.2-a14b-12"])
def test_real_configs_are_read_and_reproduce_diffusers(tmp_path, config):
    spec = read(tmp_path, config)
    ref = CLASSES[config["_class_name"]](**init_kwargs(config))
    ours = spec.solver()
    assert spec.class_name == config["_class_name"] and ours.name == spec.default_sampler
    for steps, seq in ((4, 1024), (50, 4096)):
        if isinstance(ours, FlowMatchEuler):  # as the FLUX and Qwen-Image pipelines drive it
            mu = calculate_shift(seq, config["base_image_seq_len"], config["max_image_seq_len"],
                                 config["base_shift"], config["max_shift"])
            ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        else:
            ref.set_timesteps(steps)
        sched = ours.schedule(steps, seq)
        assert torch.equal(sched.sigmas, ref.sigmas) and torch.equal(sched.timesteps, ref.timesteps.float())



EULER_CHANGES = {"num_train_timesteps": 500, "shift": 2.0, "use_dynamic_shifting": "toggle", "base_shift": 0.3,
                 "max_shift": 1.5, "base_image_seq_len": 128, "max_image_seq_len": 2048, "shift_terminal": 0.1,
                 "time_shift_type": "linear"}


def test_every_honoured_euler_key_has_a_changed_value_below():
    assert set(EULER_CHANGES) == {k for k, rule in KEYS["FlowMatchEulerDiscreteScheduler"].items() if rule == HONOURED}


def flux_pipeline_reference(config: dict, steps: int, seq: int):
    """diffusers' scheduler as the FLUX and Qwen-Image pipelines drive it: their sigmas and mu."""
    ref = FlowMatchEulerDiscreteScheduler(**init_kwargs(config))
    mu = calculate_shift(seq, ref.config.base_image_seq_len, ref.config.max_image_seq_len, ref.config.base_shift,
                         ref.config.max_shift)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return ref


@pytest.mark.parametrize("base", [FLUX_DEV, QWEN_IMAGE], ids=["flux-dev", "qwen-image"])
@pytest.mark.parametrize("key", EULER_CHANGES)
def test_flux_and_qwen_folders_with_an_honoured_key_changed_step_as_diffusers(tmp_path, base, key):
    """A FLUX or Qwen-Image folder whose config changes a key ditserve honours: diffusers' sigmas,
    timesteps and Euler steps exactly, and a different schedule exactly where diffusers' differs."""
    value = EULER_CHANGES[key]
    config = {**base, key: (not base[key]) if value == "toggle" else value}
    steps, seq = 9, 1024
    ref, ref_base = flux_pipeline_reference(config, steps, seq), flux_pipeline_reference(base, steps, seq)
    ours, ours_base = read(tmp_path, config).solver(), read(tmp_path, base).solver()
    same_run(ours, ref, steps, seq)
    changed = not torch.equal(ours.schedule(steps, seq).timesteps, ours_base.schedule(steps, seq).timesteps)
    assert changed == (not torch.equal(ref.timesteps, ref_base.timesteps))

HARMLESS_VALUES = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "squaredcos_cap_v2",
                   "trained_betas": [0.001] * 1000, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing",
                   "steps_offset": 1, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0, "sigma_min": 0.1,
                   "sigma_max": 10.0, "time_shift_type": "linear", "lambda_min_clipped": -5.1,
                   "variance_type": "learned_range"}
HARMLESS_CASES = [(name, key) for name, keys in KEYS.items() for key, rule in keys.items() if rule == HARMLESS]


@pytest.mark.parametrize("name, key", HARMLESS_CASES, ids=[f"{n[:5]}-{k}" for n, k in HARMLESS_CASES])
def test_harmless_keys_are_accepted_and_do_not_change_diffusers(tmp_path, name, key):
    """Accepted, ignored, and proved harmless: diffusers with the key changed steps exactly as ours."""
    config = {**BASE[name], key: HARMLESS_VALUES[key]}
    assert read(tmp_path, config) == read(tmp_path, BASE[name])
    ref = CLASSES[name](**init_kwargs(config))
    ref.set_timesteps(7)
    ours = read(tmp_path, config).solver()
    sched = ours.schedule(7)
    assert torch.equal(sched.sigmas, ref.sigmas) and torch.equal(sched.timesteps, ref.timesteps.float())
    gen = torch.Generator().manual_seed(0)
    x_ref = x = torch.randn(1, 3, 4, generator=gen)
    state = ours.init(sched)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(1, 3, 4, generator=gen)
        x_ref = ref.step(out, t, x_ref, return_dict=False)[0]
        x, state = ours.step(x, out, i, state)
    assert torch.equal(x, x_ref)


def test_keys_that_are_not_parameters_are_ignored(tmp_path):
    """As diffusers ignores them: Wan's original `shift` name in a UniPC config changes nothing there."""
    spec = read(tmp_path, dict(WAN21, shift=12.0, some_future_key=1, _diffusers_version="9.9"))
    assert spec == read(tmp_path, WAN21) and spec.solver().cfg.flow_shift == 3.0


def test_diffusers_aliases_are_mapped_as_diffusers_maps_them(tmp_path):
    assert read(tmp_path, dict(WAN21, solver_type="midpoint")).unipc.solver_type == "bh2"
    deis = dict(DPM, algorithm_type="deis", solver_type="bh2", final_sigmas_type="sigma_min")
    ref = DPMSolverMultistepScheduler(**init_kwargs(deis))
    assert ref.config.solver_type == "midpoint" and ref.config.algorithm_type == "dpmsolver++"
    ref.set_timesteps(5)
    same_run(read(tmp_path, deis).solver(), ref, 5)
    refused(tmp_path, dict(deis, final_sigmas_type="zero"), "algorithm_type")


# ---- overrides ---------------------------------------------------------------------------------------


def same_run(ours, ref, steps, seq=0):
    sched = ours.schedule(steps, seq)
    assert torch.equal(sched.sigmas, ref.sigmas) and torch.equal(sched.timesteps, ref.timesteps.float())
    gen = torch.Generator().manual_seed(1)
    x_ref = x = torch.randn(1, 4, 6, generator=gen)
    state = ours.init(sched)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(1, 4, 6, generator=gen)
        x_ref = ref.step(out, t, x_ref, return_dict=False)[0]
        x, state = ours.step(x, out, i, state)
        assert torch.equal(x, x_ref)


@pytest.mark.parametrize("steps", [1, 8, 30])
def test_wan_folder_to_euler_and_dpm_as_a_diffusers_user_swaps_schedulers(tmp_path, steps):
    spec = read(tmp_path, WAN22)
    euler = FlowMatchEulerDiscreteScheduler(shift=5.0)  # the Wan pipeline passes no sigmas
    euler.set_timesteps(steps)
    same_run(spec.solver("euler"), euler, steps)
    dpm = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    dpm.set_timesteps(steps)
    same_run(spec.solver("dpm++"), dpm, steps)
    assert spec.solver("unipc") == spec.solver()


def test_flow_shift_replaces_the_folders_shift(tmp_path):
    wan = read(tmp_path, WAN21)
    ref = UniPCMultistepScheduler(**init_kwargs(dict(WAN21, flow_shift=7.0)))
    ref.set_timesteps(10)
    same_run(wan.solver(flow_shift=7.0), ref, 10)
    euler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    euler.set_timesteps(10)
    same_run(wan.solver("euler", 7.0), euler, 10)
    # a dynamically shifted FLUX folder: the request's shift, statically, at every image size
    flux = read(tmp_path, FLUX_DEV)
    ref = FlowMatchEulerDiscreteScheduler(**init_kwargs(dict(FLUX_DEV, shift=2.0, use_dynamic_shifting=False)))
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6))
    same_run(flux.solver(flow_shift=2.0), ref, 6, seq=4096)
    static = flux.solver(flow_shift=2.0)
    assert torch.equal(static.schedule(6, 16).sigmas, static.schedule(6, 8192).sigmas)


@pytest.mark.parametrize("config", [FLUX_DEV, QWEN_IMAGE], ids=["flux-dev", "qwen-image"])
@pytest.mark.parametrize("seq", [256, 4096])
def test_flow_match_folder_to_unipc_and_dpm_keeps_dynamic_shifting(tmp_path, config, seq):
    """UniPC as `UniPCMultistepScheduler.from_config(folder, use_flow_sigmas=True,
    prediction_type="flow_prediction")` in FLUX's pipeline (its own grid, mu from the folder's rule,
    the terminal stretch); DPM-Solver++ with `set_timesteps(mu=...)`, i.e. flow_shift = e^mu."""
    spec = read(tmp_path, config)
    mu = calculate_shift(seq, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])
    ref = UniPCMultistepScheduler.from_config(init_kwargs(config), use_flow_sigmas=True, prediction_type="flow_prediction")
    ref.set_timesteps(9, mu=mu)
    same_run(spec.solver("unipc"), ref, 9, seq)
    ref = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, use_dynamic_shifting=True)
    ref.set_timesteps(9, mu=mu)
    same_run(spec.solver("dpm++"), ref, 9, seq)


def test_static_flow_match_folder_shift_becomes_flow_shift(tmp_path):
    sd3_like = read(tmp_path, dict(FLUX_SCHNELL, shift=3.0))
    assert sd3_like.solver("unipc").cfg.flow_shift == sd3_like.solver("dpm++").cfg.flow_shift == 3.0
    dpm_folder = read(tmp_path, dict(DPM, solver_order=3))
    assert dpm_folder.solver("unipc").cfg.flow_shift == 3.0 and dpm_folder.solver("unipc").cfg.solver_order == 2
    assert isinstance(dpm_folder.solver(), DPMSolverPP) and isinstance(dpm_folder.solver("unipc"), UniPC)


@pytest.mark.parametrize("overrides, named", [
    (dict(sampler="ddim"), "sampler"), (dict(sampler="Euler"), "sampler"), (dict(sampler=""), "sampler"),
    (dict(flow_shift=0.0), "flow_shift"), (dict(flow_shift=-1.0), "flow_shift"), (dict(flow_shift=math.nan), "flow_shift"),
    (dict(flow_shift=math.inf), "flow_shift"), (dict(flow_shift=True), "flow_shift"), (dict(flow_shift="3"), "flow_shift"),
])
def test_bad_overrides_are_refused_in_one_line(tmp_path, overrides, named):
    spec = read(tmp_path, FLUX_DEV)
    with pytest.raises(UnsupportedScheduler, match=named) as info:
        spec.solver(**overrides)
    assert "\n" not in str(info.value)
    assert set(SAMPLERS) == {"euler", "unipc", "dpm++"}


def test_flow_match_config_from_json_is_strict(tmp_path):
    assert FlowMatchConfig.from_json(write(tmp_path, FLUX_DEV)).use_dynamic_shifting
    with pytest.raises(UnsupportedScheduler, match="not a flow-match Euler"):
        FlowMatchConfig.from_json(write(tmp_path, WAN21))
