"""Our pure solvers match diffusers' schedulers step by step on random tensors."""

import json

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from ditserve.sampling.dpm import DPMConfig, DPMSolverPP
from ditserve.sampling.flow_match import FlowMatchConfig, FlowMatchEuler
from ditserve.sampling.scheduler_config import UnsupportedScheduler, read_scheduler_config
from ditserve.sampling.unipc import UniPC, UniPCConfig

WAN21 = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, solver_order=2,
             flow_shift=3.0)
UNIPC_CASES = [
    WAN21, dict(WAN21, flow_shift=5.0), dict(WAN21, flow_shift=12.0), dict(WAN21, solver_order=1),
    dict(WAN21, solver_order=3), dict(WAN21, lower_order_final=False),
    # bh1 into a final sigma of 0 is inf * 0 = NaN in diffusers (ours stays finite): compared at sigma_min
    dict(WAN21, solver_type="bh1", final_sigmas_type="sigma_min"),
    dict(WAN21, disable_corrector=[0, 2]), dict(WAN21, final_sigmas_type="sigma_min"),
]


def drive(ref, ours, sched, steps, dtype, seed=0):
    """The same random model outputs through both; returns the two final samples, asserting equality
    at every step."""
    gen = torch.Generator().manual_seed(seed)
    x_ref = x_ours = torch.randn(2, 4, 3, 5, generator=gen).to(dtype)
    state = ours.init(sched)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(2, 4, 3, 5, generator=gen).to(dtype)
        x_ref = ref.step(out, t, x_ref, return_dict=False)[0]
        x_ours, state = ours.step(x_ours, out, i, state)
        assert x_ours.dtype == x_ref.dtype
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=0)
    return x_ours


@pytest.mark.parametrize("config", UNIPC_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()
                                                                          if WAN21.get(k) != v) or "wan2.1")
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
def test_unipc_matches_diffusers_step_by_step(config, steps):
    ref = UniPCMultistepScheduler(**config)
    ref.set_timesteps(steps)
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()
           if k not in ("prediction_type", "use_flow_sigmas")}
    ours = UniPC(UniPCConfig(**cfg))
    sched = ours.schedule(steps)
    torch.testing.assert_close(sched.sigmas, ref.sigmas, rtol=0, atol=0)
    assert torch.equal(sched.timesteps, ref.timesteps.float())  # integers, as diffusers truncates them
    drive(ref, ours, sched, steps, torch.float32)


def test_unipc_bfloat16_keeps_the_sample_dtype():
    ref = UniPCMultistepScheduler(**WAN21)
    ref.set_timesteps(8)
    ours = UniPC(UniPCConfig(flow_shift=3.0))
    drive(ref, ours, ours.schedule(8), 8, torch.bfloat16)


def test_one_solver_serves_interleaved_runs():
    """Two runs of different lengths stepped alternately with one solver object each give what a
    fresh diffusers scheduler gives: no state is shared."""
    ours = UniPC(UniPCConfig(flow_shift=5.0))
    runs = []
    for steps, seed in ((6, 1), (9, 2)):
        ref = UniPCMultistepScheduler(**dict(WAN21, flow_shift=5.0))
        ref.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 4, 2, 2, generator=gen)
        outs = [torch.randn(1, 4, 2, 2, generator=gen) for _ in range(steps)]
        expected = x
        for i, t in enumerate(ref.timesteps):
            expected = ref.step(outs[i], t, expected, return_dict=False)[0]
        sched = ours.schedule(steps)
        runs.append([x, ours.init(sched), outs, expected])
    for i in range(9):
        for run in runs:
            if i < len(run[2]):
                run[0], run[1] = ours.step(run[0], run[2][i], i, run[1])
    for x, _, _, expected in runs:
        assert torch.equal(x, expected)


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("steps", [1, 4, 30])
def test_euler_with_the_schedulers_own_spacing(shift, steps):
    """Euler as a pipeline that passes no sigmas drives it (Wan with an Euler scheduler)."""
    ref = FlowMatchEulerDiscreteScheduler(shift=shift)
    ref.set_timesteps(steps)
    ours = FlowMatchEuler(FlowMatchConfig(shift=shift, spacing="scheduler"))
    sched = ours.schedule(steps)
    torch.testing.assert_close(sched.sigmas, ref.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(sched.timesteps, ref.timesteps, rtol=0, atol=0)
    drive(ref, ours, sched, steps, torch.float32)


def _write(tmp_path, config: dict):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("changes, key", [
    ({"use_karras_sigmas": True}, "use_karras_sigmas"), ({"thresholding": True}, "thresholding"),
    ({"prediction_type": "epsilon"}, "prediction_type"), ({"use_flow_sigmas": False}, "use_flow_sigmas"),
    ({"predict_x0": False}, "predict_x0"), ({"solver_order": 4}, "solver_order"),
    ({"final_sigmas_type": "denoise_to_zero"}, "final_sigmas_type"),
])
def test_unipc_keys_that_change_the_math_are_refused_in_one_line(tmp_path, changes, key):
    with pytest.raises(UnsupportedScheduler, match=key) as info:
        read_scheduler_config(_write(tmp_path, {"_class_name": "UniPCMultistepScheduler", **WAN21, **changes}))
    assert "\n" not in str(info.value)


def test_real_configs_are_read_and_harmless_keys_accepted(tmp_path):
    wan = read_scheduler_config(_write(tmp_path, {"_class_name": "UniPCMultistepScheduler", **WAN21,
                                                  "beta_schedule": "linear", "timestep_spacing": "trailing",
                                                  "_diffusers_version": "0.33.0", "not_a_parameter": 1}))
    assert wan.default_sampler == "unipc" and wan.unipc.flow_shift == 3.0
    with pytest.raises(UnsupportedScheduler, match="DDIMScheduler"):
        read_scheduler_config(_write(tmp_path, {"_class_name": "DDIMScheduler"}))


def test_overrides_rebuild_the_solver(tmp_path):
    wan = read_scheduler_config(_write(tmp_path, {"_class_name": "UniPCMultistepScheduler", **WAN21}))
    euler = wan.solver("euler")
    assert isinstance(euler, FlowMatchEuler) and euler.cfg.shift == 3.0 and euler.cfg.spacing == "scheduler"
    assert wan.solver(flow_shift=7.0).cfg.flow_shift == 7.0
    flux = read_scheduler_config(_write(tmp_path, {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0,
                                                   "use_dynamic_shifting": True}))
    unipc = flux.solver("unipc")
    assert unipc.cfg.use_dynamic_shifting and unipc.schedule(4, 4096).sigmas[0] < 1  # mu from the image size
    assert not flux.solver("euler", flow_shift=2.0).cfg.use_dynamic_shifting
    for bad in (dict(sampler="ddim"), dict(flow_shift=0.0), dict(flow_shift=float("nan"))):
        with pytest.raises(UnsupportedScheduler):
            flux.solver(**bad)


DPM = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, solver_order=2,
           flow_shift=3.0)
DPM_CASES = [DPM, dict(DPM, flow_shift=5.0), dict(DPM, solver_order=1), dict(DPM, solver_order=3),
             dict(DPM, solver_type="heun"), dict(DPM, lower_order_final=False), dict(DPM, euler_at_final=True)]


@pytest.mark.parametrize("config", DPM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()
                                                                        if DPM.get(k) != v) or "order2")
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20])
def test_dpm_solver_pp_matches_diffusers_step_by_step(config, steps):
    ref = DPMSolverMultistepScheduler(**config)
    ref.set_timesteps(steps)
    ours = DPMSolverPP(DPMConfig(**{k: v for k, v in config.items() if k not in ("prediction_type", "use_flow_sigmas")}))
    sched = ours.schedule(steps)
    torch.testing.assert_close(sched.sigmas, ref.sigmas, rtol=0, atol=0)
    assert torch.equal(sched.timesteps, ref.timesteps.float())
    drive(ref, ours, sched, steps, torch.float32)


def test_dpm_bfloat16_and_folder(tmp_path):
    ref = DPMSolverMultistepScheduler(**DPM)
    ref.set_timesteps(7)
    ours = DPMSolverPP(DPMConfig(flow_shift=3.0))
    drive(ref, ours, ours.schedule(7), 7, torch.bfloat16)
    spec = read_scheduler_config(_write(tmp_path, {"_class_name": "DPMSolverMultistepScheduler", **DPM}))
    assert isinstance(spec.solver(), DPMSolverPP) and spec.solver("unipc").cfg.flow_shift == 3.0
    with pytest.raises(UnsupportedScheduler, match="algorithm_type"):
        read_scheduler_config(_write(tmp_path, {"_class_name": "DPMSolverMultistepScheduler", **DPM,
                                                "algorithm_type": "sde-dpmsolver++"}))
