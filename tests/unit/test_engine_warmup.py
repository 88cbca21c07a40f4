"""Compiled code and CUDA graphs are per shape: the warm-up must cover the shapes that will run."""

from dataclasses import replace

from ditserve.api import GenerationRequest
from ditserve.runtime.engine import Engine
from ditserve.runtime.generator import Generator


def test_default_warmups_cover_batch_one_and_the_largest_batch(tiny_flux_schnell):
    engine: Engine = Generator.from_pretrained(tiny_flux_schnell, device="cpu").engine
    assert [r.num_images for r in engine.default_warmups(4)] == [1, 4]
    assert [r.num_images for r in engine.default_warmups(1)] == [1]
    assert [r.num_images for r in engine.default_warmups(500)] == [1, engine.pipeline.limits.max_num_images]


def test_warmup_runs_each_shape_with_two_steps(tiny_flux_schnell, monkeypatch):
    engine: Engine = Generator.from_pretrained(tiny_flux_schnell, device="cpu").engine
    seen = []
    real_run = engine.pipeline.run

    def spy(requests, control):
        seen.append([(r.height, r.width, r.num_images, r.num_inference_steps) for r in requests])
        return real_run(requests, control)

    monkeypatch.setattr(engine.pipeline, "run", spy)
    request = GenerationRequest(prompt="p", height=32, width=48, num_images=3, num_inference_steps=9,
                                max_sequence_length=16)
    engine.warmup([request, replace(request, num_images=1)])
    assert seen == [[(32, 48, 3, 2)], [(32, 48, 1, 2)]]
