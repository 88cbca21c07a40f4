"""The step cache through the parallel engine (flags as `--cache ... --ulysses-degree 2
--enable-cfg-parallel`): the ranks take one process's decisions, so the image and the counts equal
the single-process cached run. The cache's own rank tests (wrappers built by hand) are in
tests/unit/test_cache.py; this one goes through Engine.from_config and the executor."""

import numpy as np

from ditserve.api import GenerationRequest
from ditserve.config import AccelConfig, EngineConfig, ModelConfig, ParallelConfig
from ditserve.config.engine import CacheConfig
from ditserve.runtime.engine import Engine

REQUEST = GenerationRequest(prompt="a lighthouse at dusk", negative_prompt="blurry", seed=7, height=48, width=80,
                            num_inference_steps=8, true_cfg_scale=4.0, max_sequence_length=31)


def test_cfg_x_ulysses_ranks_cache_as_one_process(tiny_flux_4heads):
    model = ModelConfig(str(tiny_flux_4heads), "cpu", "float32")
    accel = AccelConfig(cache=CacheConfig(method="first-block", threshold=1.0, max_consecutive_cached_steps=1))
    single = Engine.from_config(EngineConfig(model, accel=accel)).generate(REQUEST)
    assert 0 < single.timings.cache.skipped < single.timings.cache.forwards  # some steps reused, some not
    group = Engine.from_config(EngineConfig(model, accel=accel,
                                            parallel=ParallelConfig(num_gpus=4, cfg_parallel=True, ulysses_degree=2)))
    try:
        out = group.generate(REQUEST)
    finally:
        group.close()
    # one process counts its batched cond+uncond forward once; rank 0 counts its one branch's: the same
    assert out.timings.cache == single.timings.cache
    diff = np.abs(np.asarray(out.images[0]).astype(int) - np.asarray(single.images[0]).astype(int))
    assert diff.max() <= 1
