"""The shared denoising loop: step contexts per branch, experts, guidance, cancellation."""

import pytest
import torch

from ditserve.api import Cancelled
from ditserve.pipelines.base import Pipeline, Pixels, RunControl, StageTimer
from ditserve.pipelines.denoise import Experts, Sampling, denoise
from ditserve.sampling.flow_match import FlowMatchConfig, FlowMatchEuler
from ditserve.sampling.guidance import ClassifierFree, NoGuidance

SOLVER = FlowMatchEuler(FlowMatchConfig(shift=3.0))


def run(sampling: Sampling, model, x=None, control=None):
    x = torch.zeros(2, 3) if x is None else x
    return denoise(x, sampling, model, control or RunControl(), StageTimer(torch.device("cpu")))


def branch_model(values: dict[str, float], log: list | None = None):
    """A model whose prediction is a constant per branch (and per expert, +10 for expert 1)."""
    def model(expert, x, t, ctx):
        if log is not None:
            log.append(ctx)
        chunks = [torch.full_like(c, values[b] + 10 * expert) for b, c in zip(ctx.branches, x.chunk(len(ctx.branches)))]
        return torch.cat(chunks)
    return model


def test_contexts_are_per_branch_and_persist_across_steps():
    calls = []
    sched = SOLVER.schedule(4)
    run(Sampling(sched, SOLVER, ClassifierFree(torch.tensor([2.0, 3.0]))), branch_model({"cond": 1, "uncond": 0}, calls))
    assert [c.step for c in calls] == [0, 1, 2, 3] and all(c.num_steps == 4 for c in calls)
    assert all(c.branches == ("cond", "uncond") for c in calls)  # batched: one call per step
    cond_state, uncond_state = calls[0].states
    assert cond_state is not uncond_state
    assert all(c.states[0] is cond_state and c.states[1] is uncond_state for c in calls)


def test_two_pass_cfg_equals_batched_cfg_and_keeps_the_same_states():
    values = {"cond": 1.5, "uncond": -0.5}
    sched = SOLVER.schedule(5)
    batched_calls, split_calls = [], []
    scale = torch.tensor([2.0, 4.0])
    a = run(Sampling(sched, SOLVER, ClassifierFree(scale)), branch_model(values, batched_calls))
    b = run(Sampling(sched, SOLVER, ClassifierFree(scale, batched=False)), branch_model(values, split_calls))
    assert torch.equal(a, b)
    assert [c.branches for c in split_calls[:2]] == [("cond",), ("uncond",)]
    assert split_calls[0].states[0] is split_calls[2].states[0]  # cond state kept from step 0 to 1
    # Euler from sigma 1 to 0 integrates the guided velocity: x = -(uncond + s * (cond - uncond))
    expected = -(values["uncond"] + scale * (values["cond"] - values["uncond"]))
    torch.testing.assert_close(a, expected[:, None].expand(2, 3))


def test_experts_switch_at_the_boundary_with_their_own_scale_and_states():
    sched = SOLVER.schedule(6)
    boundary = float(sched.timesteps[2])  # steps 0..2 at or above it: expert 0
    calls = []
    guidance = ClassifierFree(torch.tensor([2.0, 2.0]), scale_2=torch.tensor([5.0, 5.0]))
    x = run(Sampling(sched, SOLVER, guidance, Experts(boundary)), branch_model({"cond": 1, "uncond": 0}, calls))
    assert [c.expert for c in calls] == [0, 0, 0, 1, 1, 1]
    assert calls[0].states[0] is not calls[3].states[0]  # a cache must not carry over to another DiT
    sig = sched.sigmas
    # expert 0: guided = 2 * 1; expert 1: (0 + 10) + 5 * ((1 + 10) - (0 + 10)) = 15
    expected = -(2.0 * (sig[0] - sig[3]) + 15.0 * (sig[3] - sig[6]))
    torch.testing.assert_close(x, torch.full((2, 3), float(expected)))


def test_cancel_between_steps():
    stop = {"now": False}

    def model(expert, x, t, ctx):
        stop["now"] = ctx.step == 1
        return torch.zeros_like(x)

    control = RunControl(should_stop=lambda: stop["now"])
    with pytest.raises(Cancelled, match="before step 3/4"):
        run(Sampling(SOLVER.schedule(4), SOLVER, NoGuidance()), model, control=control)


class _Stages(Pipeline):
    """A pipeline of stub stages that records which ran, to test `run`'s stage boundaries."""

    def __init__(self):
        self.device, self.dtype, self.ran = torch.device("cpu"), torch.float32, []

    def _mark(self, name):
        self.ran.append(name)

    def encode_prompt(self, prompts, requests):
        self._mark("encode_prompt")

    def prepare_latents(self, requests):
        self._mark("prepare_latents")

    def sampling(self, latents, requests):
        self._mark("timesteps")

    def denoise(self, *args):
        self._mark("denoise")

    def decode(self, latents):
        self._mark("decode")
        return Pixels(None)


@pytest.mark.parametrize("stage", ["encode_prompt", "prepare_latents", "timesteps", "denoise", "decode"])
def test_run_stops_at_every_stage_boundary(stage):
    from ditserve.api import GenerationRequest

    pipe = _Stages()
    order = ["encode_prompt", "prepare_latents", "timesteps", "denoise", "decode"]
    control = RunControl(should_stop=lambda: len(pipe.ran) == order.index(stage))
    with pytest.raises(Cancelled, match=f"before {stage}"):
        pipe.run([GenerationRequest(prompt="p", seed=0)], control)
    assert pipe.ran == order[: order.index(stage)]
