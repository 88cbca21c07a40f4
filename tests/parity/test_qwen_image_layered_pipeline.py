"""ditserve's Qwen-Image-Layered layers equal diffusers' QwenImageLayeredPipeline within 1/255 per
pixel and channel (RGBA; float32, CPU), for the same input image, prompts, seed and settings.

diffusers sizes everything from `resolution` (640 or 1024): the input image's aspect ratio at about
resolution² pixels. At 640² a tiny run still costs seconds on a CPU, so the cases shrink that area
on diffusers' side (its module's `calculate_dimensions`) and ask ours for the same size; a separate
test checks that our default size is diffusers' 640 bucket.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import QwenImageLayeredPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_layered as layered_module
from PIL import Image
from tiny.qwen_image import reference_processor

from ditserve import Generator
from ditserve.api import GenerationRequest, InvalidRequest

SMALL_AREA = 96 * 96
real_calculate_dimensions = layered_module.calculate_dimensions


def rgba_picture(width: int, height: int, seed: int) -> Image.Image:
    """Gradients and a disc, with an alpha that is low outside the disc."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r**2).astype(float)
    rgba = np.stack([x, y, disc, 0.1 + 0.8 * disc], axis=-1)
    return Image.fromarray((rgba.clip(0, 1) * 255).astype("uint8"), "RGBA")


@pytest.fixture(scope="module")
def layered(tiny_qwen_image_layered):
    ref = QwenImageLayeredPipeline.from_pretrained(tiny_qwen_image_layered,
                                                   processor=reference_processor(tiny_qwen_image_layered))
    ref.set_progress_bar_config(disable=True)
    return ref, Generator.from_pretrained(tiny_qwen_image_layered, device="cpu", dtype=torch.float32)


@pytest.fixture
def small(monkeypatch):
    monkeypatch.setattr(layered_module, "calculate_dimensions",
                        lambda area, ratio: real_calculate_dimensions(SMALL_AREA, ratio))


def reference_layers(ref, image, prompt, negative, layers, steps, seed) -> np.ndarray:
    out = ref(image.convert("RGBA"), prompt, negative_prompt=negative, true_cfg_scale=4.0, layers=layers,
              num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    return (np.stack(out.images[0]) * 255).round().astype("uint8")


def our_layers(gen, image, prompt, negative, layers, steps, seed) -> list[Image.Image]:
    width, height = real_calculate_dimensions(SMALL_AREA, image.width / image.height)
    return gen.generate(prompt, negative_prompt=negative, true_cfg_scale=4.0, layers=layers, num_inference_steps=steps,
                        seed=seed, images=[image], height=height, width=width).images


CASES = [
    # (input image, prompt, negative, layers, steps, seed)
    (rgba_picture(80, 60, 0), "a cat on a mat", "blurry", 3, 2, 5),
    # RGB in (opaque alpha); an empty prompt: both write the image's caption first (512 tokens)
    (rgba_picture(50, 90, 1).convert("RGB"), "", None, 2, 3, 8),
]


@pytest.mark.parametrize("case", CASES, ids=["rgba-cfg-3layers", "rgb-caption-2layers"])
def test_layers_match_diffusers(layered, small, case):
    image, prompt, negative, layers, steps, seed = case
    ref, gen = layered
    expected = reference_layers(ref, image, prompt, negative, layers, steps, seed)
    got = our_layers(gen, image, prompt, negative, layers, steps, seed)
    assert len(got) == layers and all(im.mode == "RGBA" for im in got)
    got = np.stack([np.asarray(im) for im in got])
    assert got.shape == expected.shape and expected.std() > 10
    assert expected[..., 3].std() > 5  # the layers carry a real alpha channel
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_the_fixture_can_fail(layered, small):
    """Plain MSRoPE instead of the layered one moves the layers far beyond the tolerance."""
    from unittest import mock

    from ditserve.models.qwen_image import model as qwen_model

    image, prompt, negative, layers, steps, seed = CASES[0]
    ref, gen = layered
    expected = reference_layers(ref, image, prompt, negative, layers, steps, seed)

    def moved() -> int:
        got = np.stack([np.asarray(im) for im in our_layers(gen, image, prompt, negative, layers, steps, seed)])
        return int(np.abs(got.astype(int) - expected.astype(int)).max())

    msrope = lambda self, grids, n, device=None: (qwen_model.image_ids(grids, device),  # noqa: E731
                                                  qwen_model.text_ids(grids, n, device))
    with mock.patch.object(qwen_model.QwenImageDiT, "positions", msrope):
        assert moved() > 10


def test_caption_prompts_are_diffusers(layered):
    from ditserve.encoders.qwen import CAPTION_PROMPTS
    from ditserve.pipelines.qwen_image_layered import QwenImageLayeredPipeline as Ours

    ref = layered[0]
    assert (CAPTION_PROMPTS["en"], CAPTION_PROMPTS["zh"]) == (ref.image_caption_prompt_en, ref.image_caption_prompt_cn)
    assert Ours.caption_prompt == ref.image_caption_prompt_cn  # diffusers' default, use_en_prompt=False


def test_default_size_is_the_640_bucket(layered):
    engine = layered[1].engine
    for size in [(800, 600), (333, 1000)]:
        req = engine.resolve(GenerationRequest(prompt="x", images=(Image.new("RGBA", size),)))
        assert (req.width, req.height) == real_calculate_dimensions(640 * 640, size[0] / size[1])
        assert req.layers == 4  # diffusers' default


def test_layer_requests_are_checked(layered, tiny_qwen_image):
    engine = layered[1].engine
    image = (Image.new("RGBA", (64, 64)),)
    with pytest.raises(InvalidRequest, match="layers must be between 1 and 16, got 0"):
        engine.resolve(GenerationRequest(prompt="x", images=image, layers=0))
    assert engine.resolve(GenerationRequest(prompt=" ", images=image)).prompt == " "  # captioned, as diffusers
    with pytest.raises(InvalidRequest, match="prompt must be a non-empty string"):
        engine.resolve(GenerationRequest(prompt="\t", images=image))
    t2i = Generator.from_pretrained(tiny_qwen_image, device="cpu", dtype=torch.float32).engine
    with pytest.raises(InvalidRequest, match="layers is for layered models"):
        t2i.resolve(GenerationRequest(prompt="x", layers=3))


REFUSED = [
    # (folder fixture, file -> changed keys, text of the one line)
    ("tiny_qwen_image_layered", {"model_index.json": {"_class_name": "QwenImageEditPlusPipeline"}},
     "use_additional_t_cond=True needs the layered pipeline"),  # diffusers' transformer raises there
    ("tiny_qwen_image_layered", {"vae/config.json": {"input_channels": 3}}, "input_channels=3"),
    ("tiny_qwen_image", {"transformer/config.json": {"out_channels": None}}, "do not fit the VAE's z_dim=4"),
    ("tiny_qwen_image", {"transformer/config.json": {"guidance_embeds": True}}, "guidance_embeds=True"),
]


@pytest.mark.parametrize("model,changes,needle", REFUSED, ids=["t-cond", "vae-rgb", "channels", "guidance"])
def test_folders_we_cannot_run_are_refused_before_weights_load(request, tmp_path, model, changes, needle):
    from ditserve.runtime.loader import inspect_model

    folder = tmp_path / "m"
    shutil.copytree(request.getfixturevalue(model), folder)
    for name, keys in changes.items():
        raw = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps(raw | keys))
    with pytest.raises(InvalidRequest, match=needle):
        inspect_model(folder)
