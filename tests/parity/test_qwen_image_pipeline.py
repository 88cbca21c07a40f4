"""ditserve's Qwen-Image images equal diffusers' QwenImagePipeline images within 1/255 per pixel
(float32, CPU): sizes, seeds, with and without a negative prompt (norm-preserving true CFG, cond
and uncond of different text lengths in one masked batch), several images, truncated prompts."""

import numpy as np
import pytest
import torch
from diffusers import QwenImagePipeline

from ditserve import Generator
from ditserve.api import GenerationRequest

CASES = [
    # (prompt, negative, height, width, steps, true_cfg, seed, max_sequence_length)
    ("a red fox in the snow", None, 64, 64, 3, 4.0, 0, 512),
    ("a red fox in the snow", " ", 48, 80, 3, 4.0, 1234, 512),
    ("a lighthouse at dusk, oil painting", "blurry, low quality, watermark", 64, 32, 2, 2.5, 7, 512),
    ("two cats", "", 32, 64, 2, 6.0, 99, 512),
    ("a mountain lake", "ugly", 80, 48, 2, 1.0, 5, 512),  # scale <= 1: no CFG, negative ignored
    ("a very long prompt about a castle on a hill under a purple sky", "dark", 48, 48, 2, 4.0, 11, 60),
]


@pytest.fixture(scope="module")
def pipes(tiny_qwen_image):
    ref = QwenImagePipeline.from_pretrained(tiny_qwen_image)
    ref.set_progress_bar_config(disable=True)
    return ref, Generator.from_pretrained(tiny_qwen_image, device="cpu", dtype=torch.float32)


def reference_images(ref, prompt, negative, h, w, steps, true_cfg, seed, max_len=512, num_images=1):
    out = ref(prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
              true_cfg_scale=true_cfg, max_sequence_length=max_len, num_images_per_prompt=num_images,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (out.images * 255).round().astype("uint8")


def assert_close_images(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert expected.std() > 10  # a real picture, not a flat one
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("case", CASES, ids=[f"{c[2]}x{c[3]}-s{c[4]}-cfg{c[5]}-neg{c[1] is not None}-len{c[7]}"
                                             for c in CASES])
def test_image_matches_diffusers(pipes, case):
    prompt, negative, h, w, steps, true_cfg, seed, max_len = case
    ref, gen = pipes
    expected = reference_images(ref, prompt, negative, h, w, steps, true_cfg, seed, max_len)
    out = gen.generate(prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
                       true_cfg_scale=true_cfg, seed=seed, max_sequence_length=max_len)
    assert_close_images(np.asarray(out.images[0])[None], expected)


def test_several_images_per_prompt_match_diffusers(pipes):
    ref, gen = pipes
    expected = reference_images(ref, "three owls", "blurry", 32, 48, 2, 4.0, 21, num_images=3)
    out = gen.generate("three owls", negative_prompt="blurry", height=32, width=48, num_inference_steps=2,
                       seed=21, num_images=3)
    got = np.stack([np.asarray(im) for im in out.images])
    assert_close_images(got, expected)
    assert np.abs(got[0].astype(int) - got[1].astype(int)).max() > 10  # distinct noise per image


def test_batched_requests_match_one_by_one(pipes):
    """Requests of different prompt lengths, batched with CFG, get the images they get alone."""
    engine = pipes[1].engine
    reqs = [engine.resolve(GenerationRequest(prompt=p, negative_prompt=n, height=32, width=32,
                                             num_inference_steps=2, seed=s, true_cfg_scale=c))
            for p, n, s, c in [("a cat", "a very blurry and low quality picture", 1, 4.0),
                               ("a dog running on a beach at sunset", "x", 2, 3.0)]]
    for req, out in zip(reqs, engine.run_batch(reqs)):
        alone = engine.run_batch([req])[0]
        diff = np.abs(np.asarray(out.images[0]).astype(int) - np.asarray(alone.images[0]).astype(int))
        assert diff.max() <= 1


def test_defaults_follow_diffusers(pipes):
    """50 steps, true CFG 4.0, 1024x1024, 512 text tokens: as QwenImagePipeline.__call__ has them."""
    req = pipes[1].engine.resolve(GenerationRequest(prompt="x"))
    ref = pipes[0]
    assert (req.height, req.width) == (ref.default_sample_size * ref.vae_scale_factor,) * 2
    assert (req.num_inference_steps, req.true_cfg_scale, req.max_sequence_length) == (50, 4.0, 512)


def test_text_to_image_encoder_keeps_only_the_language_model(pipes):
    """Text-to-image reads the language model's hidden states alone: the vision tower and the LM head are
    not loaded onto the device (the images above match diffusers' without them; the edit pipelines, which
    read images, keep both)."""
    model = pipes[1].engine.pipeline.text.model
    assert model.model.visual is None and model.lm_head is None
    assert isinstance(model.model.language_model, torch.nn.Module)
