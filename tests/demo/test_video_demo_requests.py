"""The video demo as a default: its vocabulary and one-line warnings, its name, `ditserve generate
--num-frames` without --model-path, and what happens when the folder is not installed. A tiny random
Wan folder stands in for the bundled one, so these run whether or not it has been trained yet."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ditserve import Generator, demo
from ditserve.api import InvalidRequest
from ditserve.cli.generate import default_model_path
from ditserve.cli.main import main
from training.video_demo import config, scenes
from training.video_demo.dit import caption_variants


@pytest.fixture
def bundled(tiny_wan, monkeypatch):
    """A tiny Wan folder as the bundled video demo."""
    folder = tiny_wan("t2v")
    monkeypatch.setattr(demo, "VIDEO_MODEL_DIR", folder.resolve())
    monkeypatch.delenv("DITSERVE_DEFAULT_MODEL", raising=False)
    return folder.resolve()


@pytest.fixture
def absent(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "VIDEO_MODEL_DIR", tmp_path / "video_model")
    monkeypatch.delenv("DITSERVE_DEFAULT_MODEL", raising=False)


def test_vocabulary_is_the_training_one():
    assert demo.COLORS == tuple(scenes.COLORS) and demo.SHAPES == scenes.SHAPES
    assert demo.DIRECTIONS == tuple(scenes.DIRECTIONS) and demo.SIZE == scenes.IMAGE_SIZE
    assert (demo.VIDEO_FRAMES, demo.VIDEO_FPS) == (scenes.NUM_FRAMES, scenes.FPS)
    d = config.REQUEST_DEFAULTS
    assert (d["height"], d["width"], d["num_frames"], d["fps"]) == (64, 64, demo.VIDEO_FRAMES, demo.VIDEO_FPS)
    assert demo.VIDEO_FORM.format(color="red", shape="circle", direction="right",
                                  background="blue") == demo.VIDEO_EXAMPLE_PROMPT
    assert demo.VIDEO_MODEL_DIR.name == "video_model" and demo.VIDEO_MODEL_DIR.parent == demo.MODEL_DIR.parent


def test_every_trained_caption_is_known():
    for combo in scenes.all_combos():
        for caption in caption_variants(combo):
            assert demo.video_prompt_problem(caption) is None, caption
            assert demo.video_request_warning(caption, 64, 64, 17) is None


@pytest.mark.parametrize("prompt, height, width, frames, words", [
    ("a red fox runs", 64, 64, 17, ["not of that form", "fox", "runs"]),
    ("a pink circle moving sideways, blue background", 64, 64, 17, ["pink", "sideways"]),
    ("a red circle moving left, red background", 64, 64, 17, ["red shape on a red background"]),
    ("a red circle on the left, blue background", 64, 64, 17, ["not of that form", "on", "the"]),
    (demo.VIDEO_EXAMPLE_PROMPT, 480, 832, 17, ["832x480 is not 64x64"]),
    (demo.VIDEO_EXAMPLE_PROMPT, 64, 64, 33, ["33 frames is not 17"]),
])
def test_requests_outside_what_it_knows_warn(prompt, height, width, frames, words):
    warning = demo.video_request_warning(prompt, height, width, frames)
    assert warning.startswith("the video demo model makes 64x64, 17-frame clips") and "\n" not in warning
    assert all(w in warning for w in words), warning


def test_each_demo_warns_in_its_own_terms(bundled):
    assert demo.warning_for(bundled, "a red fox", 64, 64, 17).startswith("the video demo model")
    assert demo.warning_for(demo.MODEL_DIR, "a red fox", 64, 64).startswith("the demo model draws")
    assert demo.warning_for(demo.MODEL_DIR, demo.EXAMPLE_PROMPT, 64, 64) is None
    assert demo.warning_for(bundled, demo.VIDEO_EXAMPLE_PROMPT, 64, 64, 17) is None
    assert demo.warning_for("/some/other/model", "a red fox", 64, 64, 17) is None


def test_names_and_defaults(bundled, monkeypatch, tmp_path):
    assert demo.video_model_path() == bundled and demo.is_video_demo(bundled) and not demo.is_demo(bundled)
    assert demo.default_model(video=True) == str(bundled) == default_model_path(None, video=True)
    assert demo.default_model() == str(demo.MODEL_DIR) == default_model_path(None)
    assert demo.default_model(demo.VIDEO_NAME) == str(bundled)
    assert demo.default_model(demo.IMAGE_NAME) == str(demo.MODEL_DIR)
    assert demo.default_model("org/model", video=True) == "org/model"
    monkeypatch.setenv("DITSERVE_DEFAULT_MODEL", str(tmp_path))
    assert demo.default_model(video=True) == str(tmp_path)  # the override wins for video too
    monkeypatch.chdir(tmp_path)
    (tmp_path / demo.VIDEO_NAME).mkdir()
    assert demo.default_model(demo.VIDEO_NAME) == demo.VIDEO_NAME  # a local folder of that name wins


def test_absent_video_demo_is_said_in_one_line(absent):
    assert demo.video_model_path() is None
    with pytest.raises(InvalidRequest, match="bundled video demo model is not installed"):
        demo.default_model(video=True)
    with pytest.raises(InvalidRequest, match="'ditserve-demo-video' is not installed"):
        demo.default_model(demo.VIDEO_NAME)
    assert demo.default_model() == str(demo.MODEL_DIR)  # images are unaffected


def test_generate_with_frames_and_no_model_uses_the_video_demo(bundled, tmp_path, caplog):
    out = tmp_path / "demo.mp4"
    with caplog.at_level(logging.INFO, logger="ditserve"):
        assert main(["generate", "--prompt", demo.VIDEO_EXAMPLE_PROMPT, "--num-frames", "5", "--height", "32",
                     "--width", "32", "--num-inference-steps", "2", "--guidance-scale", "1", "--seed", "0",
                     "--device", "cpu", "--output", str(out)]) == 0
    assert out.is_file() and out.stat().st_size > 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("using the bundled video demo model" in m for m in messages), messages
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("the video demo model makes") and "32x32 is not 64x64" in m for m in warnings), warnings


def test_generator_loads_the_video_demo_by_name(bundled, caplog):
    gen = Generator.from_pretrained(demo.VIDEO_NAME, device="cpu")
    assert demo.is_video_demo(gen.engine.source.path)
    with caplog.at_level(logging.WARNING, logger="ditserve"):
        out = gen.generate("a blue square moving up, white background", seed=0, num_frames=5, height=32, width=32,
                           num_inference_steps=1, guidance_scale=1.0)
    assert np.asarray(out.videos[0]).shape == (5, 32, 32, 3)
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # the size and length, not the prompt
    assert "the prompt" not in caplog.records[0].getMessage()


def test_generate_with_frames_without_the_video_demo_fails_in_one_line(absent, tmp_path, capsys):
    code = main(["generate", "--prompt", demo.VIDEO_EXAMPLE_PROMPT, "--num-frames", "17", "--device", "cpu",
                 "--output", str(tmp_path / "x.mp4")])
    assert code != 0
    assert "bundled video demo model is not installed" in capsys.readouterr().err


def test_serve_names_the_video_demo(bundled):
    from ditserve.cli.serve import DEMO_MODEL_ID, _model_path

    assert _model_path(None) == (str(demo.MODEL_DIR), DEMO_MODEL_ID)
    assert _model_path(demo.VIDEO_NAME) == (str(bundled), demo.VIDEO_NAME)
    assert _model_path(str(bundled)) == (str(bundled), demo.VIDEO_NAME)
    assert _model_path("org/model") == ("org/model", None)
