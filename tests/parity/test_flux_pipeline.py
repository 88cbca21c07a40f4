"""ditserve's FLUX image equals diffusers' FluxPipeline image within 1/255 per pixel (float32, CPU)."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from ditserve import Generator

CASES = [
    # (fixture, prompt, negative, height, width, steps, guidance, true_cfg, seed)
    ("tiny_flux_dev", "a red fox in the snow", None, 64, 64, 3, 3.5, 1.0, 0),
    ("tiny_flux_dev", "a red fox in the snow", None, 48, 80, 4, 5.0, 1.0, 1234),
    ("tiny_flux_dev", "a lighthouse at dusk", "blurry, low quality", 64, 32, 3, 3.5, 4.0, 7),
    ("tiny_flux_dev", "two cats", "", 32, 64, 2, 1.0, 2.5, 99),
    ("tiny_flux_dev_sharded", "a bowl of fruit", None, 64, 48, 2, 3.5, 1.0, 3),
    ("tiny_flux_schnell", "a mountain lake", None, 64, 64, 4, 0.0, 1.0, 0),
    ("tiny_flux_schnell", "a mountain lake", None, 80, 48, 1, 0.0, 1.0, 2024),
    ("tiny_flux_schnell", "city at night", "daylight", 48, 48, 3, 0.0, 3.0, 5),
    ("tiny_flux_dev", "negative ignored without true cfg", "ugly", 48, 48, 2, 3.5, 1.0, 11),
]


@pytest.fixture(scope="module")
def loaded(request):
    cache = {}

    def get(name):
        if name not in cache:
            path = request.getfixturevalue(name)
            pipe = FluxPipeline.from_pretrained(path)
            pipe.set_progress_bar_config(disable=True)
            cache[name] = (pipe, Generator.from_pretrained(path, device="cpu", dtype=torch.float32))
        return cache[name]

    return get


def reference_image(pipe, prompt, negative, h, w, steps, guidance, true_cfg, seed, num_images=1):
    out = pipe(prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
               guidance_scale=guidance, true_cfg_scale=true_cfg, max_sequence_length=32,
               num_images_per_prompt=num_images, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np")
    return (out.images * 255).round().astype("uint8")


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[3]}x{c[4]}-s{c[5]}-cfg{c[7]}" for c in CASES])
def test_image_matches_diffusers(loaded, case):
    name, prompt, negative, h, w, steps, guidance, true_cfg, seed = case
    pipe, gen = loaded(name)
    expected = reference_image(pipe, prompt, negative, h, w, steps, guidance, true_cfg, seed)
    out = gen.generate(prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
                       guidance_scale=guidance, true_cfg_scale=true_cfg, seed=seed, max_sequence_length=32)
    got = np.asarray(out.images[0])
    assert got.shape == expected[0].shape == (h, w, 3)
    assert expected.std() > 10  # a real picture, not a flat one
    assert np.abs(got.astype(int) - expected[0].astype(int)).max() <= 1


def test_several_images_per_prompt_match_diffusers(loaded):
    pipe, gen = loaded("tiny_flux_dev")
    expected = reference_image(pipe, "three owls", None, 32, 48, 2, 3.5, 1.0, 21, num_images=3)
    out = gen.generate("three owls", height=32, width=48, num_inference_steps=2, seed=21,
                       num_images=3, max_sequence_length=32)
    got = np.stack([np.asarray(im) for im in out.images])
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(got[0].astype(int) - got[1].astype(int)).max() > 10  # distinct noise per image


def test_batched_requests_match_one_by_one(loaded, tiny_flux_dev):
    """Two requests run as one batch give each the image it gets alone."""
    from ditserve.api import GenerationRequest

    _, gen = loaded("tiny_flux_dev")
    engine = gen.engine
    reqs = [engine.resolve(GenerationRequest(prompt=p, height=48, width=48, num_inference_steps=2,
                                             seed=s, guidance_scale=g, max_sequence_length=32))
            for p, s, g in [("a cat", 1, 3.5), ("a dog", 2, 5.0)]]
    batched = engine.run_batch(reqs)
    for req, out in zip(reqs, batched):
        alone = engine.run_batch([req])[0]
        diff = np.abs(np.asarray(out.images[0]).astype(int) - np.asarray(alone.images[0]).astype(int))
        assert diff.max() <= 1


def test_timings_cover_every_stage(loaded):
    _, gen = loaded("tiny_flux_schnell")
    out = gen.generate("timed", height=32, width=32, num_inference_steps=3, seed=0, max_sequence_length=16)
    assert set(out.timings.stages) == {"encode_prompt", "prepare_latents", "timesteps", "denoise", "decode"}
    assert len(out.timings.steps) == 3 and all(s > 0 for s in out.timings.steps)


@pytest.mark.parametrize("sampler", ["unipc", "dpm++"])
def test_sampler_override_matches_diffusers_with_that_scheduler(loaded, sampler):
    """`sampler=` on a FLUX-dev folder equals FluxPipeline with that scheduler swapped in as a diffusers
    user does it (flow sigmas; the pipeline then drops its own sigmas and passes the folder's mu)."""
    import diffusers

    pipe, gen = loaded("tiny_flux_dev")
    euler = pipe.scheduler
    if sampler == "unipc":
        pipe.scheduler = diffusers.UniPCMultistepScheduler.from_config(
            euler.config, use_flow_sigmas=True, prediction_type="flow_prediction")
    else:
        pipe.scheduler = diffusers.DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, use_dynamic_shifting=True)
    try:
        expected = reference_image(pipe, "a red fox in the snow", None, 48, 64, 5, 3.5, 1.0, 3)
    finally:
        pipe.scheduler = euler
    kwargs = dict(height=48, width=64, num_inference_steps=5, guidance_scale=3.5, seed=3, max_sequence_length=32)
    got = np.asarray(gen.generate("a red fox in the snow", sampler=sampler, **kwargs).images[0])
    assert np.abs(got.astype(int) - expected[0].astype(int)).max() <= 1
    plain = np.asarray(gen.generate("a red fox in the snow", **kwargs).images[0])
    assert np.abs(got.astype(int) - plain.astype(int)).mean() > 1  # not Euler's image
