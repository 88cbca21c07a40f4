"""Videos come back from rank 0 through shared memory (runtime/handoff.py): the same arrays, and no
block left behind in /dev/shm."""

import multiprocessing as mp
import os

import numpy as np
import pytest

from ditserve.api import GenerationOutput, GenerationRequest
from ditserve.api.output import Timings
from ditserve.config import EngineConfig, ModelConfig, ParallelConfig
from ditserve.runtime.engine import Engine
from ditserve.runtime.executor import ParallelEngine
from ditserve.runtime.handoff import SharedArray, collect_videos, share_videos


def blocks() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("psm_")}


def _share_in_child(queue) -> None:
    video = np.arange(5 * 6 * 7 * 3, dtype=np.uint8).reshape(5, 6, 7, 3)
    queue.put(share_videos([GenerationOutput(images=[], timings=Timings(), seed=1, videos=[video, video[::-1]])]))


def test_videos_cross_processes_and_the_blocks_are_unlinked():
    before = blocks()
    queue = mp.get_context("spawn").Queue()
    child = mp.get_context("spawn").Process(target=_share_in_child, args=(queue,))
    child.start()
    shared = queue.get(timeout=120)
    child.join(60)
    assert child.exitcode == 0 and all(isinstance(v, SharedArray) for v in shared[0].videos)
    got = collect_videos(shared)[0].videos
    video = np.arange(5 * 6 * 7 * 3, dtype=np.uint8).reshape(5, 6, 7, 3)
    assert np.array_equal(got[0], video) and np.array_equal(got[1], video[::-1])
    assert blocks() == before  # unlinked at once, though the arrays still use the pages
    got[0][0, 0, 0] = 255  # an ordinary writable array, its own memory
    assert got[0][0, 0, 0, 0] == 255 and got[1][-1, 0, 0, 0] == 0
    with pytest.raises(FileNotFoundError):
        collect_videos(shared)


def test_a_video_through_the_executor_equals_the_in_process_one(tiny_wan):
    model = ModelConfig(str(tiny_wan("t2v")), "cpu", "float32")
    request = GenerationRequest(prompt="a cat walks on the grass", seed=2, num_inference_steps=2, height=48,
                                width=80, num_frames=5)
    expected = Engine.from_config(EngineConfig(model)).generate(request).videos[0]
    before = blocks()
    group = ParallelEngine.start(EngineConfig(model, parallel=ParallelConfig(num_gpus=1)))
    try:
        got = group.generate(request).videos[0]
    finally:
        group.close()
    assert np.array_equal(got, expected) and blocks() == before
