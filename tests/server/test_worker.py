"""The worker process through its handle: cancellation between steps, batch rules, errors, load failure."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import time

import pytest

from ditserve.api import DitserveError, GenerationRequest, InvalidRequest
from ditserve.config import EngineConfig, ModelConfig
from ditserve.api import Cancelled
from ditserve.runtime.loader import inspect_model
from ditserve.runtime.worker import NotStarted, WorkerHandle


def handle_for(model) -> WorkerHandle:
    return WorkerHandle(EngineConfig(ModelConfig(str(model), "cpu", "float32"), max_batch_size=2),
                        slots=2, threads=1)


def resolved(model, steps: int, seed: int = 0, size: int = 32) -> GenerationRequest:
    source = inspect_model(model)
    request = GenerationRequest("a fox", height=size, width=size, num_inference_steps=steps, seed=seed,
                                max_sequence_length=16)
    return request.resolve(source.defaults, source.pipeline_cls.limits)


def test_worker_runs_cancels_and_reports(tiny_flux_dev):
    long = resolved(tiny_flux_dev, steps=500)
    short = resolved(tiny_flux_dev, steps=3)

    async def scenario():
        handle = handle_for(tiny_flux_dev)
        await handle.start()
        try:
            # A flag set before the run is seen before the first stage: no work at all.
            handle.cancel(0, 101)
            with pytest.raises(Cancelled, match=r"before encode_prompt"):
                await handle.run([101], [long])

            # Set mid-run, it stops the run at the next step boundary: every step the worker ran
            # was reported, none ran after the check that saw the flag.
            steps = []

            def on_progress(step, total):
                steps.append(step)
                if step == 3:
                    handle.cancel(0, 102)

            handle.on_progress = on_progress
            with pytest.raises(Cancelled) as info:
                await handle.run([102], [long])
            stopped_before = int(re.search(r"before step (\d+)/", str(info.value))[1])
            assert steps == list(range(1, stopped_before)) and stopped_before < 500

            # A batch stops only when all of its requests are cancelled.
            handle.on_progress = lambda step, total: handle.cancel(0, 103)
            outputs = await handle.run([103, 104], [short, resolved(tiny_flux_dev, steps=3, seed=1)])
            assert [o.seed for o in outputs] == [0, 1] and all(len(o.images) == 1 for o in outputs)

            # Errors come back typed, and the worker keeps serving.
            with pytest.raises(InvalidRequest, match="share size"):
                await handle.run([105, 106], [short, resolved(tiny_flux_dev, steps=3, size=48)])
            assert len(await handle.run([107], [short])) == 1
            assert handle.ready and handle.restarts == 0
        finally:
            await handle.stop()
        return handle

    handle = asyncio.run(scenario())
    assert handle.state == "stopped" and not handle._proc.is_alive()


def test_batch_sent_to_a_dead_worker_is_not_started(tiny_flux_dev):
    """The worker died a moment ago and the handle has not heard yet: the send fails, and the batch
    comes back as NotStarted (the scheduler queues it again), not as a failed request."""
    async def scenario():
        handle = handle_for(tiny_flux_dev)
        await handle.start()
        try:
            os.kill(handle.pid, signal.SIGKILL)
            time.sleep(1.0)  # blocks the event loop: the child is gone, its exit not yet processed
            assert handle.ready
            with pytest.raises(NotStarted, match="before it took the batch"):
                await handle.run([1], [resolved(tiny_flux_dev, steps=2)])
            await asyncio.wait_for(handle.wait_ready(), 120)  # a harness limit: the restart loads the model
            assert len(await handle.run([2], [resolved(tiny_flux_dev, steps=2)])) == 1
            assert handle.restarts == 1
        finally:
            await handle.stop()

    asyncio.run(scenario())


def test_load_failure_is_reported_at_start(tiny_flux_dev, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_flux_dev, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")

    async def scenario():
        handle = handle_for(broken)
        with pytest.raises(DitserveError):
            await handle.start()
        return handle

    handle = asyncio.run(scenario())
    assert not handle.ready


@pytest.mark.parametrize("family", ["flux", pytest.param("wan", marks=pytest.mark.slow)])  # wan: loads a model
def test_cancel_after_the_last_step_skips_the_decode(family, request, monkeypatch):
    """Issue 24.2: a run abandoned during its last denoising step stops before the VAE decode (every
    stage boundary checks, not only the steps), so the next request does not wait for a decode nobody
    wants; a run left alone decodes as usual."""
    from ditserve import Generator
    from ditserve.pipelines.base import RunControl

    if family == "flux":  # the session's Python API on tiny FLUX (tests/server/conftest.py)
        engine = request.getfixturevalue("reference").engine
    else:
        engine = Generator.from_pretrained(request.getfixturevalue("tiny_wan")("t2v"), device="cpu",
                                           dtype="float32").engine
    extra = {"max_sequence_length": 16} if family == "flux" else {"num_frames": 5}
    request = GenerationRequest("a fox", height=32, width=48, num_inference_steps=3, seed=0, **extra)
    seen, stopped = [], []

    def on_step(step, total):
        seen.append(step)
        if step == total:
            stopped.append(True)

    decoded = []
    original = engine.pipeline.decode
    monkeypatch.setattr(engine.pipeline, "decode", lambda latents: decoded.append(1) or original(latents))
    with pytest.raises(Cancelled, match=r"^cancelled before decode$"):
        engine.generate(request, RunControl(should_stop=lambda: bool(stopped), on_step=on_step))
    assert seen == [1, 2, 3] and decoded == []
    assert engine.generate(request) is not None and decoded == [1]
