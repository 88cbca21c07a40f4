"""Our pure flow-match schedule reproduces diffusers' FlowMatchEulerDiscreteScheduler exactly."""

import json
import warnings

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from ditserve.sampling.flow_match import (
    FlowMatchConfig,
    dynamic_shift_mu,
    euler_step,
    schedule,
    time_shift,
)

FLUX_DEV = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)
FLUX_SCHNELL = dict(FLUX_DEV, shift=1.0, use_dynamic_shifting=False)
STATIC_SHIFT = dict(FLUX_DEV, shift=3.0, use_dynamic_shifting=False)
QWEN_LIKE = dict(FLUX_DEV, max_shift=0.9, base_shift=0.5, max_image_seq_len=8192,
                 shift_terminal=0.02, time_shift_type="exponential")
LINEAR = dict(FLUX_DEV, time_shift_type="linear")


def reference(config: dict, steps: int, seq_len: int):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    mu = calculate_shift(seq_len, sched.config.base_image_seq_len, sched.config.max_image_seq_len,
                         sched.config.base_shift, sched.config.max_shift)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(sigmas=sigmas, mu=mu)
    return sched


@pytest.mark.parametrize("config", [FLUX_DEV, FLUX_SCHNELL, STATIC_SHIFT, QWEN_LIKE, LINEAR],
                         ids=["dev", "schnell", "static", "terminal", "linear"])
@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("seq_len", [16, 1024, 4096, 6889])
def test_sigmas_and_timesteps_match_diffusers(config, steps, seq_len):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # diffusers' own 0/0, see below
        ref = reference(config, steps, seq_len)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ours divides by zero nowhere
        ours = schedule(steps, seq_len, FlowMatchConfig(**config))
    assert ours.sigmas.dtype == ref.sigmas.dtype == torch.float32
    if torch.isnan(ref.sigmas).any():
        # a 1-step terminal-stretched schedule is 0/0 in diffusers (NaN); the stretch fixes sigma = 1,
        # so ours stays at 1 and gives the 1-step image
        assert steps == 1 and config.get("shift_terminal")
        assert torch.equal(ours.sigmas, torch.tensor([1.0, 0.0])) and torch.equal(ours.timesteps, torch.tensor([1000.0]))
        return
    # bit-exact
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=0)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)


def test_mu_matches_flux_calculate_shift():
    cfg = FlowMatchConfig(**FLUX_DEV)
    for seq in (16, 256, 1000, 4096, 8192):
        assert dynamic_shift_mu(seq, cfg) == calculate_shift(seq)


def test_schnell_schedule_is_unshifted_linspace():
    ours = schedule(4, 4096, FlowMatchConfig(**FLUX_SCHNELL))
    assert torch.allclose(ours.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_step_matches_diffusers_step(dtype):
    ref = reference(FLUX_DEV, 6, 256)
    ours = schedule(6, 256, FlowMatchConfig(**FLUX_DEV))
    gen = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, 16, 8, generator=gen).to(dtype)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(2, 16, 8, generator=gen).to(dtype)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x_ours = euler_step(x_ours, v, ours.sigmas[i], ours.sigmas[i + 1])
        assert x_ours.dtype == x_ref.dtype == dtype
        assert torch.equal(x_ours, x_ref)


def test_config_from_json_reads_scheduler_config(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_DEV}))
    assert FlowMatchConfig.from_json(path) == FlowMatchConfig(**FLUX_DEV)
    path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", **FLUX_DEV, "use_karras_sigmas": True}))
    with pytest.raises(ValueError, match="use_karras_sigmas=true is not supported by ditserve's flow-match Euler"):
        FlowMatchConfig.from_json(path)


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_time_shift_at_zero_is_zero_without_a_warning(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shifted = time_shift(kind, 0.8, np.array([1.0, 0.5, 0.0], dtype=np.float32))
    assert shifted.dtype == np.float32 and shifted[0] == 1 and shifted[-1] == 0
