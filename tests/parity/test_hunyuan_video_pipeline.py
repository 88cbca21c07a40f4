"""HunyuanVideoPipeline: ditserve's frames equal diffusers' (float32, CPU) within 1/255 per pixel, per
frame, with embedded guidance alone and with true CFG, at several sizes and frame counts (past 17
frames the VAE decodes in blended time tiles); the fixture is able to fail; bad input is refused in
one line before any model work."""

import numpy as np
import pytest
import torch

from ditserve.api import GenerationRequest, InvalidRequest
from ditserve.config import EngineConfig, ModelConfig
from ditserve.runtime.engine import Engine

PROMPT, NEGATIVE = "a red cat walks on the grass", "blurry, static"
BASE = dict(height=32, width=48, num_frames=9, num_inference_steps=2, guidance_scale=6.0)

_ENGINES, _RUNS = {}, {}


def reference(folder, **kw) -> np.ndarray:
    import diffusers

    diffusers.utils.logging.disable_progress_bar()
    pipe = diffusers.HunyuanVideoPipeline.from_pretrained(folder)
    frames = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="np").frames[0]
    return (frames * 255).round().astype("uint8")


def ours(folder, **kw) -> np.ndarray:
    key = (folder, tuple(sorted(kw.items())))
    if key not in _RUNS:
        if folder not in _ENGINES:
            _ENGINES[folder] = Engine.from_config(EngineConfig(ModelConfig(str(folder), "cpu", "float32")))
        _RUNS[key] = _ENGINES[folder].generate(GenerationRequest(seed=kw.pop("seed", 0), **kw)).videos[0]
    return _RUNS[key]


CASES = {
    "embedded": BASE,
    "true_cfg": dict(BASE, height=48, width=32, num_frames=5, negative_prompt=NEGATIVE, true_cfg_scale=4.0),
    "time_tiles": dict(BASE, height=16, width=16, num_frames=21),  # 6 latent frames: blended time tiles
    # a negative prompt as long as the prompt (in tokens): cond and uncond in one batch
    "true_cfg_batched": dict(BASE, height=16, width=32, num_frames=5, negative_prompt="a cat walks on the red grass",
                             true_cfg_scale=4.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_frames_match_diffusers(tiny_hunyuan_video, case):
    settings = CASES[case]
    expected = reference(tiny_hunyuan_video, prompt=PROMPT, **settings)
    got = ours(tiny_hunyuan_video, prompt=PROMPT, **settings)
    assert got.shape == expected.shape == (settings["num_frames"], settings["height"], settings["width"], 3)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1, (case, diff.max(), diff.mean())
    assert expected.std() > 10 and ((expected == 0) | (expected == 255)).mean() < 0.4  # not flat, not clamped


@pytest.mark.parametrize("change", [
    dict(prompt="a blue dog sits"), dict(seed=1), dict(guidance_scale=2.0),
    dict(negative_prompt=NEGATIVE, true_cfg_scale=4.0),  # the negative prompt counts with true CFG ...
])
def test_fixture_can_fail(tiny_hunyuan_video, change):
    """Each mistake the parity test must catch moves pixels far more than 1/255."""
    base = ours(tiny_hunyuan_video, prompt=PROMPT, **BASE)
    other = ours(tiny_hunyuan_video, **{"prompt": PROMPT, **BASE, **change})
    assert np.abs(base.astype(int) - other.astype(int)).max() > 20, change


def test_negative_prompt_alone_changes_nothing(tiny_hunyuan_video):
    """... and only with true_cfg_scale > 1, as in diffusers."""
    base = ours(tiny_hunyuan_video, prompt=PROMPT, **BASE)
    other = ours(tiny_hunyuan_video, prompt=PROMPT, negative_prompt=NEGATIVE, **BASE)
    assert np.array_equal(base, other)


@pytest.mark.parametrize("change, named", [
    (dict(num_frames=8), r"num_frames"), (dict(height=40), "height must be a multiple of 16"),
    (dict(max_sequence_length=300), "max_sequence_length"), (dict(guidance_scale_2=3.0), "one DiT"),
])
def test_bad_input_is_refused_in_one_line(tiny_hunyuan_video, change, named):
    ours(tiny_hunyuan_video, prompt=PROMPT, **BASE)  # engine loaded
    with pytest.raises(InvalidRequest, match=named) as err:
        _ENGINES[tiny_hunyuan_video].generate(GenerationRequest(**{**BASE, "prompt": PROMPT, "seed": 0, **change}))
    assert "\n" not in str(err.value)


def _left_padding(load):
    def patched(*args, **kwargs):
        enc = load(*args, **kwargs)
        enc.tokenizer.padding_side = "left"
        return enc
    return patched


@pytest.mark.parametrize("mistake", ["last_hidden_layer", "no_crop", "left_padding"])
def test_text_mistakes_show(tiny_hunyuan_video, monkeypatch, mistake):
    """Mistakes the parity test could miss if the fixture were too smooth move pixels by far more than 1/255
    (the DiT's text mask: tests/parity/test_hunyuan_video_dit.py)."""
    import ditserve.encoders.hunyuan_video as enc

    base = ours(tiny_hunyuan_video, prompt=PROMPT, **BASE)
    if mistake == "last_hidden_layer":
        monkeypatch.setattr(enc, "HIDDEN_LAYERS_TO_SKIP", 0)
    elif mistake == "no_crop":
        monkeypatch.setattr(enc.LlamaPromptEncoder.__init__, "__defaults__", (enc.PROMPT_TEMPLATE, 0))
    else:
        load = enc.LlamaPromptEncoder.load.__func__
        monkeypatch.setattr(enc.LlamaPromptEncoder, "load", classmethod(_left_padding(load)))
    engine = Engine.from_config(EngineConfig(ModelConfig(str(tiny_hunyuan_video), "cpu", "float32")))
    other = engine.generate(GenerationRequest(prompt=PROMPT, seed=0, **BASE)).videos[0]
    assert np.abs(base.astype(int) - other.astype(int)).max() > 20, mistake


def test_teacache_skips_steps(tiny_hunyuan_video):
    """TeaCache4HunyuanVideo's fit drives the step cache (with a threshold for the tiny model's large
    changes): some steps reuse the cached residual and the video stays close to the uncached one."""
    from ditserve.config import AccelConfig
    from ditserve.config.engine import CacheConfig

    settings = dict(BASE, num_inference_steps=6)
    cfg = EngineConfig(ModelConfig(str(tiny_hunyuan_video), "cpu", "float32"),
                       accel=AccelConfig(cache=CacheConfig(method="teacache", threshold=50.0)))
    out = Engine.from_config(cfg).generate(GenerationRequest(prompt=PROMPT, seed=0, **settings))
    assert out.timings.cache.method == "teacache" and 0 < out.timings.cache.skipped < out.timings.cache.forwards
    full = ours(tiny_hunyuan_video, prompt=PROMPT, **settings)
    assert np.abs(out.videos[0].astype(int) - full.astype(int)).mean() < 20


def test_batched_requests_match_one_by_one(tiny_hunyuan_video):
    """Requests of different prompt lengths batched with true CFG (the text mask, cond and uncond in
    separate calls) get the videos they get alone."""
    ours(tiny_hunyuan_video, prompt=PROMPT, **BASE)  # engine loaded
    engine = _ENGINES[tiny_hunyuan_video]
    settings = dict(BASE, num_frames=5, negative_prompt=NEGATIVE, true_cfg_scale=4.0)
    reqs = [engine.resolve(GenerationRequest(prompt=p, seed=s, **settings))
            for p, s in ((PROMPT, 0), ("a dog", 1), ("a blue dog sits on the red grass", 2))]
    for req, out in zip(reqs, engine.run_batch(reqs)):
        alone = engine.run_batch([req])[0]
        assert np.abs(out.videos[0].astype(int) - alone.videos[0].astype(int)).max() <= 1


def test_defaults_follow_diffusers(tiny_hunyuan_video):
    """720x1280, 129 frames, 50 steps, embedded guidance 6.0, true CFG 1.0, 256 text tokens: as
    HunyuanVideoPipeline.__call__ has them; the folder's scheduler shift (7.0) is read as is."""
    import inspect

    import diffusers

    ours(tiny_hunyuan_video, prompt=PROMPT, **BASE)  # engine loaded
    req = _ENGINES[tiny_hunyuan_video].resolve(GenerationRequest(prompt="x"))
    params = inspect.signature(diffusers.HunyuanVideoPipeline.__call__).parameters
    for name in ("height", "width", "num_frames", "num_inference_steps", "guidance_scale", "true_cfg_scale",
                 "max_sequence_length"):
        assert getattr(req, name) == params[name].default, name
    pipe = _ENGINES[tiny_hunyuan_video].pipeline
    assert pipe.scheduler_spec.solver().cfg.shift == 7.0
