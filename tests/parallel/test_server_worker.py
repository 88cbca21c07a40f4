"""The server's worker process (runtime/worker.py, unchanged) serving through a parallel group: its
Engine.from_config starts the ranks; batches, cancellation and a killed rank behave as the server
expects (a killed rank fails its batch with an engine error; the group restarts and serves again);
stopping the worker leaves no rank behind."""

import asyncio
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from ditserve.api import Cancelled, EngineError, GenerationRequest
from ditserve.config import EngineConfig, ModelConfig, ParallelConfig
from ditserve.runtime.worker import WorkerHandle

REQUEST = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=7, height=48, width=80,
               num_inference_steps=3, true_cfg_scale=4.0, max_sequence_length=31)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def resolved(engine_source, **kw):
    return GenerationRequest(**{**REQUEST, **kw}).resolve(engine_source.defaults, engine_source.limits)


def test_the_server_worker_serves_through_the_group(tiny_flux_dev, reference):
    from ditserve.runtime.loader import inspect_model

    source = inspect_model(tiny_flux_dev)
    cfg = EngineConfig(ModelConfig(str(tiny_flux_dev), "cpu", "float32"),
                       parallel=ParallelConfig(num_gpus=2, ulysses_degree=2))

    async def scenario():
        handle = WorkerHandle(cfg, slots=1, threads=1, log_level="WARNING")
        await handle.start()
        ranks = children(handle.pid)
        try:
            out = (await handle.run([1], [resolved(source)]))[0]
            # cancellation: the server marks the request; the ranks stop within a step
            steps = []
            handle.on_progress = lambda step, total: steps.append(step)
            task = asyncio.create_task(handle.run([2], [resolved(source, num_inference_steps=200)]))
            while not steps:
                await asyncio.sleep(0.05)
            handle.cancel(0, 2)
            with pytest.raises(Cancelled):
                await task
            cancelled_after = len(steps)
            # a killed rank: the batch fails as an engine error, the group restarts, the worker serves on
            steps.clear()
            task = asyncio.create_task(handle.run([3], [resolved(source, num_inference_steps=200)]))
            while not steps:
                await asyncio.sleep(0.05)
            os.kill(ranks[1], signal.SIGKILL)
            with pytest.raises(EngineError, match="rank 1"):
                await task
            again = (await handle.run([4], [resolved(source)]))[0]
            restarted = children(handle.pid)
        finally:
            worker = handle.pid
            await handle.stop()
        return out, cancelled_after, again, ranks, restarted, worker

    out, cancelled_after, again, ranks, restarted, worker = asyncio.run(scenario())
    expected = reference(tiny_flux_dev, REQUEST)
    for got in (out, again):
        assert np.abs(np.asarray(got.images[0]).astype(int) - expected.astype(int)).max() <= 1
    assert cancelled_after < 200
    assert len(ranks) == 2 and len(restarted) == 2 and set(ranks).isdisjoint(restarted)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(gone(p) for p in [worker, *ranks, *restarted]):
        time.sleep(0.1)
    assert all(gone(p) for p in [worker, *ranks, *restarted]), "a process outlived the worker"
