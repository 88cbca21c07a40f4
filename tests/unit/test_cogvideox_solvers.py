"""CogVideoX's DDIM and DPM solvers against diffusers' CogVideoXDDIMScheduler / CogVideoXDPMScheduler,
step by step on random tensors, bit-equal in float32 (the DPM's noise drawn from equal generators);
the strict config reader."""

import inspect
import json

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

from ditserve.sampling.cogvideox import KEYS, RULES, RequestNoise
from ditserve.sampling.scheduler_config import (
    UnsupportedScheduler,
    read_scheduler_config,
)

# the CogVideoX folders' scheduler: 2B ships snr_shift_scale 3.0, 5B and 1.5 1.0
COGVIDEOX_2B = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085, clip_sample=False,
                    clip_sample_range=1.0, num_train_timesteps=1000, prediction_type="v_prediction",
                    rescale_betas_zero_snr=True, sample_max_value=1.0, set_alpha_to_one=True, snr_shift_scale=3.0,
                    steps_offset=0, timestep_spacing="trailing", trained_betas=None)
CASES = {
    "2b": COGVIDEOX_2B, "5b": dict(COGVIDEOX_2B, snr_shift_scale=1.0),
    "leading,offset": dict(COGVIDEOX_2B, timestep_spacing="leading", steps_offset=1),
    "linspace,epsilon": dict(COGVIDEOX_2B, timestep_spacing="linspace", prediction_type="epsilon",
                             rescale_betas_zero_snr=False),
    "linear,sample,final": dict(COGVIDEOX_2B, beta_schedule="linear", prediction_type="sample", set_alpha_to_one=False),
    "cosine": dict(COGVIDEOX_2B, beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=False),
}
CLASSES = {"CogVideoXDDIMScheduler": CogVideoXDDIMScheduler, "CogVideoXDPMScheduler": CogVideoXDPMScheduler}


def ours_for(tmp_path, name, config):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": name, **config}))
    return read_scheduler_config(path).solver()


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("steps", [1, 3, 7, 50])
def test_steps_equal_diffusers(tmp_path, name, case, steps):
    config = CASES[case]
    ref = CLASSES[name](**config)
    ref.set_timesteps(steps)
    solver = ours_for(tmp_path, name, config)
    dpm = name == "CogVideoXDPMScheduler"
    if dpm:
        solver = solver.for_run(RequestNoise([torch.Generator().manual_seed(5)], [2]))
    sched = solver.schedule(steps)
    assert torch.equal(sched.timesteps, ref.timesteps.float())
    gen, ref_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(5)
    x = x_ref = torch.randn(2, 3, 4, 5, generator=gen)
    state, old = solver.init(sched), None
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(2, 3, 4, 5, generator=gen)
        if dpm:
            x_ref, old = ref.step(out, old, t, ref.timesteps[i - 1] if i > 0 else None, x_ref, generator=ref_gen,
                                  return_dict=False)
        else:
            x_ref = ref.step(out, t, x_ref, return_dict=False)[0]
        x, state = solver.step(x, out, i, state)
        assert torch.equal(x, x_ref), (case, i)
    assert torch.isfinite(x).all()


@pytest.mark.parametrize("name", list(CLASSES))
def test_key_lists_cover_the_installed_signatures(name):
    params = set(inspect.signature(CLASSES[name].__init__).parameters) - {"self"}
    assert set(KEYS) == params and set(RULES) <= params
    defaults = inspect.signature(CLASSES[name].__init__).parameters
    for key, (default, _) in RULES.items():
        assert default == defaults[key].default, key


@pytest.mark.parametrize("change, named", [
    (dict(prediction_type="flow_prediction"), "prediction_type"), (dict(timestep_spacing="karras"), "timestep_spacing"),
    (dict(snr_shift_scale=0), "snr_shift_scale"), (dict(beta_schedule="cosine"), "beta_schedule"),
    (dict(trained_betas=[0.1] * 3), "trained_betas"), (dict(num_train_timesteps=True), "num_train_timesteps"),
])
def test_bad_values_are_refused_in_one_line(tmp_path, change, named):
    with pytest.raises(UnsupportedScheduler, match=named) as err:
        ours_for(tmp_path, "CogVideoXDDIMScheduler", {**COGVIDEOX_2B, **change})
    assert "\n" not in str(err.value)


def test_overrides_are_refused(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "CogVideoXDPMScheduler", **COGVIDEOX_2B}))
    spec = read_scheduler_config(path)
    assert spec.default_sampler == "dpm" and spec.solver("dpm").name == "dpm"
    for bad in (dict(sampler="euler"), dict(flow_shift=3.0)):
        with pytest.raises(ValueError, match="overrides"):
            spec.solver(**bad)
    with pytest.raises(ValueError, match="for_run"):
        spec.solver().init(spec.solver().schedule(3))
