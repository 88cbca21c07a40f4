"""The executor with real rank processes over gloo: rank 0 drives, outputs match the single
process, progress arrives, a cancel stops every rank within a step, a killed rank fails its batch
and the group restarts, and no process outlives the executor, even when the executor is killed."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from ditserve.api import Cancelled, GenerationRequest, InvalidRequest
from ditserve.config import EngineConfig, ModelConfig, ParallelConfig
from ditserve.pipelines.base import RunControl
from ditserve.runtime.engine import Engine
from ditserve.runtime.executor import ParallelEngine, RankDied

REQUEST = dict(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=7, height=48, width=80,
               num_inference_steps=3, true_cfg_scale=4.0, max_sequence_length=31)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


@pytest.fixture(scope="module")
def engine(tiny_flux_dev):
    cfg = EngineConfig(ModelConfig(str(tiny_flux_dev), "cpu", "float32"),
                       parallel=ParallelConfig(num_gpus=2, cfg_parallel=True))
    eng = Engine.from_config(cfg)
    yield eng
    pids = [p for e in eng.executors for p in e.pids]
    eng.close()
    assert not [p for p in pids if alive(p)]


def test_the_group_serves_the_single_process_pixels_with_progress(engine, tiny_flux_dev, reference):
    assert isinstance(engine, ParallelEngine) and engine.ready
    assert len(engine.executors[0].pids) == 2 and str(engine.pipeline.device) == "cpu x2 (cfg 2)"
    steps = []
    out = engine.generate(GenerationRequest(**REQUEST), RunControl(on_step=lambda s, n: steps.append((s, n))))
    got = np.asarray(out.images[0])
    expected = reference(tiny_flux_dev, REQUEST)
    assert expected.std() > 10 and np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert steps == [(1, 3), (2, 3), (3, 3)]
    assert out.timings.steps and len(out.timings.steps) == 3


def test_a_cancel_reaches_every_rank_within_a_step(engine):
    """should_stop turns true after step 2 of 40; the ranks stop at the next step boundary they
    reach after the executor relays it (one step in flight at most, plus the relay's 50 ms)."""
    steps, stopped_at = [], []

    def should_stop():
        if len(steps) >= 2 and not stopped_at:
            stopped_at.append(len(steps))
        return bool(stopped_at)

    request = engine.resolve(GenerationRequest(**dict(REQUEST, num_inference_steps=40)))
    with pytest.raises(Cancelled):
        engine.run_batch([request], RunControl(should_stop=should_stop, on_step=lambda s, n: steps.append(s)))
    assert len(steps) - stopped_at[0] <= 2
    # the group goes on serving
    assert engine.generate(GenerationRequest(**dict(REQUEST, num_inference_steps=1))).images


def test_requests_are_still_validated_before_any_rank_works(engine):
    with pytest.raises(InvalidRequest):
        engine.generate(GenerationRequest(prompt="x", height=50))


def test_a_killed_rank_fails_its_batch_and_the_group_restarts(engine, tiny_flux_dev, reference):
    executor = engine.executors[0]
    old = list(executor.pids)
    steps = []
    threading.Thread(target=lambda: wait_until(lambda: len(steps) >= 1, 60) and os.kill(old[1], signal.SIGKILL),
                     daemon=True).start()
    request = engine.resolve(GenerationRequest(**dict(REQUEST, num_inference_steps=200)))
    with pytest.raises(RankDied, match="rank 1"):
        engine.run_batch([request], RunControl(on_step=lambda s, n: steps.append(s)))
    assert not engine.ready or executor.restarts >= 1
    assert wait_until(lambda: engine.ready, 120), "the group did not come back"
    assert wait_until(lambda: not any(alive(p) for p in old), 10), "the old group left processes behind"
    assert set(executor.pids).isdisjoint(old) and executor.restarts == 1
    got = np.asarray(engine.generate(GenerationRequest(**REQUEST)).images[0])
    assert np.abs(got.astype(int) - reference(tiny_flux_dev, REQUEST).astype(int)).max() <= 1


def test_a_load_failure_is_one_line_and_leaves_no_process(tiny_flux_3heads):
    """Ulysses 2 on a 3-head model: refused by the ranks while loading, naming the numbers."""
    bad = EngineConfig(ModelConfig(str(tiny_flux_3heads), "cpu", "float32"),
                       parallel=ParallelConfig(num_gpus=2, ulysses_degree=2))
    before = set(_children())
    with pytest.raises(InvalidRequest) as info:
        ParallelEngine.start(bad)
    assert "--ulysses-degree 2 needs the model's 3 attention heads / --tp-size 1 divisible by it" in str(info.value)
    assert "\n" not in str(info.value)
    assert wait_until(lambda: set(_children()) <= before, 10)


def _children() -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if alive(int(p))]


def test_ranks_exit_when_the_executor_process_is_killed(tiny_flux_dev, tmp_path):
    """SIGKILL of the process holding the executor (no cleanup runs there): its ranks notice and exit."""
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {os.getcwd()!r})
        from ditserve.config import EngineConfig, ModelConfig, ParallelConfig
        from ditserve.runtime.engine import Engine
        eng = Engine.from_config(EngineConfig(ModelConfig({str(tiny_flux_dev)!r}, "cpu", "float32"),
                                              parallel=ParallelConfig(num_gpus=2, ring_degree=2)))
        print(*eng.executors[0].pids, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        proc.kill()
        proc.wait()
        assert wait_until(lambda: not any(alive(p) for p in pids), 15), "ranks outlived their executor"
    finally:
        proc.kill()
