"""Our pure solvers against diffusers' schedulers, step by step on random tensors.

Every comparison is bit-equal (rtol = atol = 0), in float32 and in bfloat16: our solvers do the same
float operations in the same order and dtypes as diffusers, so a tolerance would only hide a
reordered expression or a dtype slip. Our solvers are built through the strict reader from the same
config dicts the diffusers schedulers get, so the real folders' path is what is tested.
"""

import json
import warnings

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from ditserve.sampling.dpm import DPMConfig, DPMSolverPP
from ditserve.sampling.scheduler_config import read_scheduler_config
from ditserve.sampling.unipc import UniPC, UniPCConfig

FLOW = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
# Wan's folders: UniPC, order 2, bh2, flow sigmas. Wan2.1 T2V-1.3B / I2V-480P ship flow_shift 3.0;
# T2V-14B / I2V-720P 5.0; Wan2.2's reference code samples T2V-A14B at shift 12.0 and I2V-A14B and
# TI2V-5B at 5.0 (its diffusers folders ship other values; users set these)
WAN = dict(FLOW, num_train_timesteps=1000, solver_order=2, solver_type="bh2", lower_order_final=True,
           final_sigmas_type="zero", predict_x0=True, disable_corrector=[], flow_shift=3.0)
WAN_SHIFTS = {"wan2.1-480p": 3.0, "wan2.1-720p/wan2.2-5b": 5.0, "wan2.2-t2v-a14b": 12.0}
UNIPC_CASES = {
    **{name: dict(WAN, flow_shift=shift) for name, shift in WAN_SHIFTS.items()},
    "order1": dict(WAN, solver_order=1), "order3": dict(WAN, solver_order=3),
    "order3,shift5": dict(WAN, solver_order=3, flow_shift=5.0),
    "sigma_min": dict(WAN, final_sigmas_type="sigma_min"),
    "no-lower-order-final,sigma_min": dict(WAN, lower_order_final=False, final_sigmas_type="sigma_min"),
    "no-lower-order-final,order1": dict(WAN, solver_order=1, lower_order_final=False),
    "disable_corrector": dict(WAN, disable_corrector=[0, 2, 7]),
    "no-corrector,order3": dict(WAN, solver_order=3, disable_corrector=list(range(50))),
    "bh1,sigma_min": dict(WAN, solver_type="bh1", final_sigmas_type="sigma_min"),
    "bh1,order3,sigma_min": dict(WAN, solver_type="bh1", solver_order=3, final_sigmas_type="sigma_min"),
    "terminal": dict(WAN, shift_terminal=0.1),
}
STEPS = [1, 2, 3, 10, 50]
DPM = dict(FLOW, num_train_timesteps=1000, solver_order=2, flow_shift=3.0)
DPM_CASES = {
    "order2": DPM, "shift5": dict(DPM, flow_shift=5.0), "shift12": dict(DPM, flow_shift=12.0),
    "order1": dict(DPM, solver_order=1), "order3": dict(DPM, solver_order=3), "heun": dict(DPM, solver_type="heun"),
    "order3,heun": dict(DPM, solver_order=3, solver_type="heun"), "no-lower-order-final": dict(DPM, lower_order_final=False),
    "euler_at_final": dict(DPM, euler_at_final=True),
    # the last sigma then comes from the beta schedule; the last steps keep their order from 15 steps on
    "sigma_min": dict(DPM, final_sigmas_type="sigma_min"),
    "sigma_min,order3": dict(DPM, solver_order=3, final_sigmas_type="sigma_min"),
    "sigma_min,euler_at_final": dict(DPM, final_sigmas_type="sigma_min", euler_at_final=True),
    "sigma_min,no-lower-order-final": dict(DPM, final_sigmas_type="sigma_min", lower_order_final=False),
    "sigma_min,scaled_linear": dict(DPM, final_sigmas_type="sigma_min", beta_schedule="scaled_linear",
                                    beta_start=0.00085, beta_end=0.012),
    "sigma_min,cosine": dict(DPM, final_sigmas_type="sigma_min", beta_schedule="squaredcos_cap_v2"),
}


def ours_from(tmp_path, cls, config: dict, **overrides):
    """Our solver for `config`, read from a scheduler_config.json as a folder ships it."""
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": cls.__name__, **config}))
    return read_scheduler_config(path).solver(**overrides)


def drive(ref, ours, steps, dtype=torch.float32, seed=0, shape=(2, 4, 3, 5), schedule_args=(), equal_nan=False):
    """Random model outputs through diffusers (driven with its own timesteps) and through ours; asserts
    bit-equality of the schedule and of every step. Returns our per-step samples."""
    sched = ours.schedule(steps, *schedule_args)
    assert torch.equal(sched.sigmas, ref.sigmas)
    assert torch.equal(sched.timesteps, ref.timesteps.float())  # integers where diffusers truncates them
    gen = torch.Generator().manual_seed(seed)
    x_ref = x_ours = torch.randn(shape, generator=gen).to(dtype)
    state, xs = ours.init(sched), []
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(shape, generator=gen).to(dtype)
        x_ref = ref.step(out, t, x_ref, return_dict=False)[0]
        x_ours, state = ours.step(x_ours, out, i, state)
        assert x_ours.dtype == x_ref.dtype == dtype
        torch.testing.assert_close(x_ours, x_ref, rtol=0, atol=0, equal_nan=equal_nan, msg=f"step {i}")
        xs.append(x_ours)
    return xs


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("name", UNIPC_CASES)
def test_unipc_matches_diffusers_step_by_step(tmp_path, name, steps):
    ref = UniPCMultistepScheduler(**UNIPC_CASES[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diffusers' 0/0 below
        ref.set_timesteps(steps)
    ours = ours_from(tmp_path, UniPCMultistepScheduler, UNIPC_CASES[name])
    if name == "terminal" and steps == 1:
        # one sigma of 1 has nothing to stretch: diffusers computes 0/0 (NaN), ours keeps it
        assert torch.isnan(ref.sigmas[0]) and torch.equal(ours.schedule(1).sigmas, torch.tensor([1 - 1e-6, 0.0]))
        return
    drive(ref, ours, steps)


@pytest.mark.parametrize("name", ["wan2.1-480p", "wan2.2-t2v-a14b", "order1", "order3", "bh1,sigma_min",
                                  "no-lower-order-final,sigma_min", "disable_corrector"])
def test_unipc_bfloat16_like_diffusers(tmp_path, name):
    """diffusers runs UniPC in the sample's dtype (rhos rounded to it); bfloat16 stays bfloat16."""
    ref = UniPCMultistepScheduler(**UNIPC_CASES[name])
    ref.set_timesteps(12)
    drive(ref, ours_from(tmp_path, UniPCMultistepScheduler, UNIPC_CASES[name]), 12, torch.bfloat16)


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_unipc_bh1_into_zero_is_finite_where_diffusers_is_nan(steps):
    """bh1's B(h) = -h is -inf into sigma 0; diffusers multiplies it by a residual of 0 and gets NaN.
    Ours skips the empty residual: every step equals diffusers' until the last, which is the x0
    prediction (what bh2 gives there)."""
    config = dict(WAN, solver_type="bh1")
    ref = UniPCMultistepScheduler(**config)
    ref.set_timesteps(steps)
    ours = UniPC(UniPCConfig(solver_type="bh1", flow_shift=3.0))
    sched = ours.schedule(steps)
    gen = torch.Generator().manual_seed(3)
    x_ref = x = torch.randn(1, 4, 6, generator=gen)
    state = ours.init(sched)
    for i, t in enumerate(ref.timesteps):
        out = torch.randn(1, 4, 6, generator=gen)
        x_ref = ref.step(out, t, x_ref, return_dict=False)[0]
        x_in = x
        x, state = ours.step(x, out, i, state)
        if i < steps - 1:
            assert torch.equal(x, x_ref)
    assert torch.isnan(x_ref).all() and torch.equal(x, x_in - sched.sigmas[-2] * out)


@pytest.mark.parametrize("changes", [dict(), dict(solver_order=3, final_sigmas_type="sigma_min")])
def test_unipc_without_lower_order_final_reproduces_diffusers_non_finite_last_step(changes):
    """Refused in folders (scheduler_config.py), but the solver itself still matches diffusers: the
    last multistep update into sigma 0 (h = inf), or order 3 over sigma_min's zero-length last step
    (h = 0), is not finite."""
    ref = UniPCMultistepScheduler(**dict(WAN, lower_order_final=False, **changes))
    ref.set_timesteps(4)
    cfg = UniPCConfig(flow_shift=3.0, lower_order_final=False, **changes)
    xs = drive(ref, UniPC(cfg), 4, equal_nan=True)
    assert not torch.isfinite(xs[-1]).any() and torch.isfinite(xs[-2]).all()


def test_unipc_duplicate_first_timesteps_need_begin_index():
    """At shift 12 and 100 steps the first two integer timesteps are both 999. diffusers finds its
    step index from the timestep (the second match), so WanPipeline calls set_begin_index(0); we index
    steps directly, which is what that gives."""
    ref = UniPCMultistepScheduler(**dict(WAN, flow_shift=12.0))
    ref.set_timesteps(100)
    assert ref.timesteps[0] == ref.timesteps[1]
    ref.set_begin_index(0)
    drive(ref, UniPC(UniPCConfig(flow_shift=12.0)), 100, shape=(1, 2, 3))


@pytest.mark.parametrize("steps", STEPS + [20])
@pytest.mark.parametrize("name", DPM_CASES)
def test_dpm_solver_pp_matches_diffusers_step_by_step(tmp_path, name, steps):
    ref = DPMSolverMultistepScheduler(**DPM_CASES[name])
    ref.set_timesteps(steps)
    drive(ref, ours_from(tmp_path, DPMSolverMultistepScheduler, DPM_CASES[name]), steps)


@pytest.mark.parametrize("name", ["order2", "order3", "heun", "sigma_min,order3"])
def test_dpm_bfloat16_like_diffusers(tmp_path, name):
    """diffusers upcasts the sample to float32 for the update and returns the model output's dtype."""
    ref = DPMSolverMultistepScheduler(**DPM_CASES[name])
    ref.set_timesteps(16)
    drive(ref, ours_from(tmp_path, DPMSolverMultistepScheduler, DPM_CASES[name]), 16, torch.bfloat16)


def _reference_run(ref_factory, steps, seed, shape=(1, 4, 2, 3)):
    ref = ref_factory()
    ref.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    outs = [torch.randn(shape, generator=gen) for _ in range(steps)]
    expected = x
    for out, t in zip(outs, ref.timesteps):
        expected = ref.step(out, t, expected, return_dict=False)[0]
    return x, outs, expected


@pytest.mark.parametrize("ours, ref_factory", [
    (UniPC(UniPCConfig(flow_shift=5.0, solver_order=3)),
     lambda: UniPCMultistepScheduler(**dict(WAN, flow_shift=5.0, solver_order=3))),
    (DPMSolverPP(DPMConfig(flow_shift=5.0, solver_order=3)),
     lambda: DPMSolverMultistepScheduler(**dict(DPM, flow_shift=5.0, solver_order=3))),
], ids=["unipc", "dpm++"])
def test_one_solver_serves_interleaved_runs(ours, ref_factory):
    """Two runs of different lengths stepped alternately with one solver object each give exactly what
    a fresh diffusers scheduler gives: nothing is shared between runs."""
    runs = []
    for steps, seed in ((6, 1), (11, 2)):
        x, outs, expected = _reference_run(ref_factory, steps, seed)
        runs.append([x, ours.init(ours.schedule(steps)), outs, expected])
    for i in range(11):
        for run in runs:
            if i < len(run[2]):
                run[0], run[1] = ours.step(run[0], run[2][i], i, run[1])
    for x, _, _, expected in runs:
        assert torch.equal(x, expected)


@pytest.mark.parametrize("ours", [UniPC(UniPCConfig(flow_shift=3.0, solver_order=3)),
                                  DPMSolverPP(DPMConfig(flow_shift=3.0, solver_order=3))], ids=["unipc", "dpm++"])
def test_a_state_is_never_mutated(ours):
    """Stepping from the same state twice gives the same result, and leaves the state's tensors as
    they were (a state may be kept, retried or shared)."""
    gen = torch.Generator().manual_seed(0)
    state, x = ours.init(ours.schedule(6)), torch.randn(1, 3, 4, generator=gen)
    for i in range(4):
        out = torch.randn(1, 3, 4, generator=gen)
        before = [t.clone() for t in (*state.outputs, state.sigmas)]
        first, _ = ours.step(x, out, i, state)
        again, state_next = ours.step(x.clone(), out.clone(), i, state)
        assert torch.equal(first, again)
        assert all(torch.equal(a, b) for a, b in zip(before, (*state.outputs, state.sigmas)))
        x, state = first, state_next


def test_schedules_build_without_warnings():
    """No divide-by-zero or 0/0 warnings at the edges (1 step, terminal stretch, large shifts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for steps in (1, 2, 50):
            for cfg in (UniPCConfig(flow_shift=12.0, shift_terminal=0.02), UniPCConfig(final_sigmas_type="sigma_min")):
                UniPC(cfg).schedule(steps)
            DPMSolverPP(DPMConfig(flow_shift=12.0)).schedule(steps)
