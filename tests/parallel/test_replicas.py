"""--num-replicas: independent engine replicas behind one Engine; concurrent batches run on
different replicas at once, each giving the single-process pixels."""

import threading

import numpy as np

from ditserve.api import GenerationRequest
from ditserve.config import EngineConfig, ModelConfig, ParallelConfig
from ditserve.runtime.engine import Engine

REQUEST = dict(prompt="a red fox in the snow", negative_prompt="blurry", seed=3, height=48, width=80,
               num_inference_steps=20, true_cfg_scale=4.0)


def test_two_replicas_serve_two_batches_at_once(tiny_qwen_image, reference):
    engine = Engine.from_config(EngineConfig(ModelConfig(str(tiny_qwen_image), "cpu", "float32"),
                                             parallel=ParallelConfig(num_gpus=2, num_replicas=2)))
    try:
        assert [len(e.pids) for e in engine.executors] == [1, 1] and str(engine.pipeline.device).endswith("x2 replicas")
        outputs, running, overlap = {}, [], []

        def generate(seed):
            def on_step(step, total):
                running.append(seed)
                if len({s for s in running[-20:]}) == 2:
                    overlap.append(step)
            from ditserve.pipelines.base import RunControl

            out = engine.generate(GenerationRequest(**dict(REQUEST, seed=seed)), RunControl(on_step=on_step))
            outputs[seed] = np.asarray(out.images[0])

        threads = [threading.Thread(target=generate, args=(seed,)) for seed in (3, 4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert [e.batches for e in engine.executors] == [1, 1]  # one batch on each replica
        assert overlap, "the replicas did not run at the same time"
        for seed, got in outputs.items():
            expected = reference(tiny_qwen_image, dict(REQUEST, seed=seed))
            assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    finally:
        engine.close()
