"""Wan 2.1 / 2.2 pipelines: ditserve's frames equal diffusers' (float32, CPU) within 1/255 per
pixel, per frame, for every checkpoint shape; and the fixtures are able to fail."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve.api import GenerationRequest, InvalidRequest
from ditserve.runtime.engine import Engine
from ditserve.config import EngineConfig, ModelConfig

PROMPT, NEGATIVE = "a red cat walks on the grass", "blurry, static"


def input_image(w=56, h=40, seed=0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def reference(folder, variant, image=None, **kw):
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    i2v = image is not None
    cls = diffusers.WanImageToVideoPipeline if i2v else diffusers.WanPipeline
    pipe = cls.from_pretrained(folder)
    extra = {"image": image} if i2v else {}
    frames = pipe(**kw, **extra, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    return (frames * 255).round().astype("uint8")


_ENGINES = {}


def ours(folder, image=None, **kw) -> np.ndarray:
    if folder not in _ENGINES:
        _ENGINES[folder] = Engine.from_config(EngineConfig(ModelConfig(str(folder), "cpu", "float32")))
    req = GenerationRequest(seed=0, fps=16, images=() if image is None else (image,), **kw)
    return _ENGINES[folder].generate(req).videos[0]


CASES = {
    # variant: (request settings, input image?)
    "t2v": (dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=1.0), False),
    "t2v_cfg": (dict(height=48, width=32, num_frames=9, num_inference_steps=3, guidance_scale=4.0,
                     negative_prompt=NEGATIVE), False),
    "i2v": (dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0,
                 negative_prompt=NEGATIVE), True),
    "a14b": (dict(height=32, width=48, num_frames=5, num_inference_steps=6, guidance_scale=4.0,
                  guidance_scale_2=2.0, negative_prompt=NEGATIVE), False),
    "i2v_a14b": (dict(height=48, width=32, num_frames=5, num_inference_steps=6, guidance_scale=3.0,
                      guidance_scale_2=1.5), True),
    "ti2v": (dict(height=64, width=64, num_frames=5, num_inference_steps=3, guidance_scale=4.0), False),
    "ti2v_image": (dict(height=64, width=96, num_frames=5, num_inference_steps=3, guidance_scale=4.0), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_frames_match_diffusers(tiny_wan, case):
    settings, with_image = CASES[case]
    variant = case.replace("_cfg", "").replace("_image", "")
    folder = tiny_wan(variant)
    image = input_image() if with_image else None
    expected = reference(folder, variant, image, prompt=PROMPT, **settings)
    got = ours(folder, image, prompt=PROMPT, **settings)
    assert got.shape == expected.shape == (settings["num_frames"], settings["height"], settings["width"], 3)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1, (case, diff.max(), diff.mean())
    assert expected.std() > 10  # not a flat, degenerate video


@pytest.mark.parametrize("change, variant", [
    (dict(prompt="a blue dog sits"), "t2v"), (dict(negative_prompt=None), "a14b"), (dict(guidance_scale_2=4.0), "a14b"),
    (dict(seed=1), "t2v"),
])
def test_fixtures_can_fail(tiny_wan, change, variant):
    """Each mistake the parity test must catch moves pixels far more than 1/255."""
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=32, width=48, num_frames=5, num_inference_steps=6,
                guidance_scale=4.0)
    if variant == "a14b":
        base["guidance_scale_2"] = 2.0
    folder = tiny_wan(variant)
    seed = change.pop("seed", 0)
    a = ours(folder, **base)
    req = dict(base, **change)
    engine = _ENGINES[folder]
    b = engine.generate(GenerationRequest(seed=seed, fps=16, **req)).videos[0]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 2


def test_bad_video_requests_are_refused_before_model_work(tiny_wan):
    from ditserve.runtime.loader import inspect_model

    t2v, ti2v = inspect_model(tiny_wan("t2v")), inspect_model(tiny_wan("ti2v"))
    assert ti2v.defaults.fps == 24 and ti2v.limits.size_multiple == 32 and ti2v.limits.max_images == 1
    for bad, param in [(dict(num_frames=8), "num_frames"), (dict(num_frames=0), "num_frames"),
                       (dict(height=40), "height"), (dict(fps=0), "fps"),
                       (dict(images=(input_image(),)), "image")]:
        with pytest.raises(InvalidRequest) as info:
            GenerationRequest(prompt="p", **bad).resolve(t2v.defaults, t2v.limits)
        assert info.value.param == param
    with pytest.raises(InvalidRequest, match="multiple of 32"):
        GenerationRequest(prompt="p", height=48).resolve(ti2v.defaults, ti2v.limits)


@pytest.mark.parametrize("sampler", ["dpm++", "euler"])
def test_sampler_override_matches_diffusers_with_that_scheduler(tiny_wan, sampler):
    """`sampler=` rebuilds the solver from the folder's flow_shift, as a diffusers user swaps schedulers."""
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    folder = tiny_wan("t2v")
    pipe = diffusers.WanPipeline.from_pretrained(folder)
    shift = pipe.scheduler.config.flow_shift
    pipe.scheduler = (diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                            flow_shift=shift) if sampler == "dpm++"
                      else diffusers.FlowMatchEulerDiscreteScheduler(shift=shift))
    settings = dict(height=32, width=48, num_frames=5, num_inference_steps=5, guidance_scale=4.0)
    expected = pipe(prompt=PROMPT, **settings, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    expected = (expected * 255).round().astype("uint8")
    got = ours(folder, prompt=PROMPT, sampler=sampler, **settings)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - ours(folder, prompt=PROMPT, **settings).astype(int)).mean() > 1  # not UniPC's
