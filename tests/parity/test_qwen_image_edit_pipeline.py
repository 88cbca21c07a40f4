"""ditserve's Qwen-Image-Edit (and Edit Plus) images equal diffusers' within 1/255 per pixel
(float32, CPU), for the same input images, prompts, seeds and settings.

Both pipelines resize each input image to about 1024² pixels for the VAE. On a CPU that makes
every edit cost seconds of VAE encoding, so most cases shrink that area to 128² on both sides
(diffusers' module constant and our pipeline's `vae_image_area`): the rule under test is the
same, only the constant differs. One case runs at the real area, and a separate test checks that
the default output size follows diffusers' rule at 1024².
"""

import numpy as np
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module
from PIL import Image
from tiny.qwen_image import reference_processor

from ditserve import Generator
from ditserve.api import GenerationRequest

SMALL_AREA = 128 * 128
real_calculate_dimensions = edit_module.calculate_dimensions


def picture(width: int, height: int, seed: int) -> Image.Image:
    """A smooth test picture (gradients plus a disc), so resizing filters matter but noise does not."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r**2).astype(float)
    rgb = np.stack([x, y, disc], axis=-1) * 0.7 + rng.uniform(0, 0.3, size=3)
    return Image.fromarray((rgb.clip(0, 1) * 255).astype("uint8"))


def load_pair(path, ref_cls):
    ref = ref_cls.from_pretrained(path, processor=reference_processor(path))
    ref.set_progress_bar_config(disable=True)
    return ref, Generator.from_pretrained(path, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def edit(tiny_qwen_image_edit):
    return load_pair(tiny_qwen_image_edit, QwenImageEditPipeline)


@pytest.fixture(scope="module")
def plus(tiny_qwen_image_edit_plus):
    return load_pair(tiny_qwen_image_edit_plus, QwenImageEditPlusPipeline)


@pytest.fixture
def small_area(monkeypatch):
    """Shrink the VAE input area to SMALL_AREA in diffusers' edit pipelines and in ours."""
    monkeypatch.setattr(edit_module, "calculate_dimensions",
                        lambda area, ratio: real_calculate_dimensions(SMALL_AREA, ratio))
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", SMALL_AREA)

    def apply(gen: Generator) -> Generator:
        monkeypatch.setattr(type(gen.engine.pipeline), "vae_image_area", SMALL_AREA)
        return gen

    return apply


def reference_images(ref, images, prompt, negative, h, w, steps, true_cfg, seed, num_images=1):
    out = ref(images, prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
              true_cfg_scale=true_cfg, num_images_per_prompt=num_images,
              generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (out.images * 255).round().astype("uint8")


def ours(gen, images, prompt, negative, h, w, steps, true_cfg, seed, num_images=1) -> np.ndarray:
    out = gen.generate(prompt, negative_prompt=negative, height=h, width=w, num_inference_steps=steps,
                       true_cfg_scale=true_cfg, seed=seed, images=images, num_images=num_images)
    return np.stack([np.asarray(im) for im in out.images])


def assert_close_images(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert expected.std() > 10  # a real picture, not a flat one
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


EDIT_CASES = [
    # (input size, prompt, negative, height, width, steps, true_cfg, seed)
    ((80, 60), "make the disc blue", None, 64, 48, 2, 4.0, 0),
    ((80, 60), "make the disc blue", " ", 64, 48, 2, 4.0, 0),
    ((50, 90), "add a hat", "blurry, distorted", 48, 64, 3, 2.5, 42),
    ((64, 64), "turn it into a watercolor", "", 32, 32, 2, 4.0, 7),
]


@pytest.mark.parametrize("case", EDIT_CASES, ids=[f"in{c[0][0]}x{c[0][1]}-out{c[3]}x{c[4]}-neg{c[2] is not None}"
                                                  for c in EDIT_CASES])
def test_edit_matches_diffusers(edit, small_area, case):
    (iw, ih), prompt, negative, h, w, steps, true_cfg, seed = case
    ref, gen = edit
    image = picture(iw, ih, seed)
    expected = reference_images(ref, image, prompt, negative, h, w, steps, true_cfg, seed)
    assert_close_images(ours(small_area(gen), [image], prompt, negative, h, w, steps, true_cfg, seed), expected)


def test_edit_at_the_real_vae_area_matches_diffusers(edit):
    ref, gen = edit
    assert gen.engine.pipeline.vae_image_area == 1024 * 1024
    image = picture(96, 64, 3)
    expected = reference_images(ref, image, "night scene", "day", 32, 48, 2, 4.0, 3)
    assert_close_images(ours(gen, [image], "night scene", "day", 32, 48, 2, 4.0, 3), expected)


def test_edit_plus_areas_are_diffusers_constants(plus):
    pipeline = plus[1].engine.pipeline
    assert pipeline.vae_image_area == plus_module.VAE_IMAGE_SIZE
    assert pipeline.condition_image_area == plus_module.CONDITION_IMAGE_SIZE


def test_edit_several_images_per_prompt_match_diffusers(edit, small_area):
    ref, gen = edit
    image = picture(70, 70, 5)
    expected = reference_images(ref, image, "snow", " ", 32, 32, 2, 4.0, 5, num_images=2)
    assert_close_images(ours(small_area(gen), [image], "snow", " ", 32, 32, 2, 4.0, 5, num_images=2), expected)


PLUS_CASES = [
    # (input sizes, prompt, negative, height, width, seed)
    ([(80, 60)], "make it red", " ", 48, 64, 1),
    ([(80, 60), (40, 90)], "put the second picture in the first", "low quality", 64, 48, 2),
    ([(64, 64), (96, 48), (48, 48)], "combine all three", None, 32, 32, 3),
]


@pytest.mark.parametrize("case", PLUS_CASES, ids=[f"{len(c[0])}img-neg{c[2] is not None}" for c in PLUS_CASES])
def test_edit_plus_matches_diffusers(plus, small_area, case):
    sizes, prompt, negative, h, w, seed = case
    ref, gen = plus
    images = [picture(iw, ih, seed + i) for i, (iw, ih) in enumerate(sizes)]
    expected = reference_images(ref, images, prompt, negative, h, w, 2, 4.0, seed)
    assert_close_images(ours(small_area(gen), images, prompt, negative, h, w, 2, 4.0, seed), expected)


@pytest.mark.parametrize("sizes", [[(800, 600)], [(333, 1000)], [(640, 480), (100, 500)]])
def test_default_size_follows_the_last_input_image(plus, sizes):
    """No size given: diffusers' 1024²-area rule on the (last) input image, floored to 16."""
    engine = plus[1].engine
    images = tuple(Image.new("RGB", s) for s in sizes)
    req = engine.resolve(GenerationRequest(prompt="x", images=images))
    width, height = plus_module.calculate_dimensions(1024 * 1024, sizes[-1][0] / sizes[-1][1])
    assert (req.width, req.height) == (width // 16 * 16, height // 16 * 16)
    only_height = engine.resolve(GenerationRequest(prompt="x", images=images, height=512))
    assert (only_height.width, only_height.height) == (width // 16 * 16, 512)


@pytest.fixture(scope="module")
def plus_2511(tiny_qwen_image_edit_2511):
    return load_pair(tiny_qwen_image_edit_2511, QwenImageEditPlusPipeline)


def test_edit_2511_zero_cond_t_matches_diffusers(plus_2511, plus, small_area):
    """Qwen-Image-Edit-2511 (zero_cond_t: input-image tokens modulated at timestep 0): three
    non-square inputs of different sizes, a non-square output, true CFG."""
    sizes, prompt, negative, h, w, seed = [(80, 60), (40, 90), (96, 48)], "put them together", "low quality", 64, 48, 2
    ref, gen = plus_2511
    assert gen.engine.pipeline.dit.cfg.zero_cond_t
    images = [picture(iw, ih, seed + i) for i, (iw, ih) in enumerate(sizes)]
    expected = reference_images(ref, images, prompt, negative, h, w, 2, 4.0, seed)
    assert_close_images(ours(small_area(gen), images, prompt, negative, h, w, 2, 4.0, seed), expected)
    # the same weights without zero_cond_t (the Edit Plus folder) give a clearly different picture
    without = ours(small_area(plus[1]), images, prompt, negative, h, w, 2, 4.0, seed)
    assert np.abs(without.astype(int) - expected.astype(int)).max() > 8


def test_edit_encoder_keeps_its_vision_tower(edit):
    model = edit[1].engine.pipeline.text.model
    assert model.model.visual is not None and model.lm_head is not None
