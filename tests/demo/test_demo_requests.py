"""What the demo model can draw, said before it draws: its vocabulary (the one it was trained on), the
one-line warning for anything else, and `Generator.from_pretrained()` loading it from Python."""

from __future__ import annotations

import logging

import pytest

from ditserve import Generator, demo
from training.demo import scenes
from training.demo.dit import caption_variants


def test_vocabulary_is_the_training_one():
    assert demo.COLORS == tuple(scenes.COLORS) and demo.SHAPES == scenes.SHAPES
    assert demo.POSITIONS == tuple(scenes.POSITIONS) and demo.SIZE == scenes.IMAGE_SIZE
    assert demo.FORM.format(color="red", shape="circle", position="left", background="blue") == demo.EXAMPLE_PROMPT


def test_every_trained_caption_is_known():
    for combo in scenes.all_combos():
        for caption in caption_variants(combo):  # as generated, "an orange ...", capitalised
            assert demo.prompt_problem(caption) is None, caption
            assert demo.request_warning(caption, 64, 64) is None


@pytest.mark.parametrize("prompt, words", [
    ("a red fox in the snow", ["fox", "in", "snow"]),
    ("a pink circle on the middle, blue background", ["pink", "middle"]),
    ("a red circle on the left, red background", ["red shape on a red background"]),
    ("a red circle", []),
])
def test_prompt_outside_the_vocabulary_is_named(prompt, words):
    problem = demo.prompt_problem(prompt)
    assert problem is not None and all(w in problem for w in words), problem


@pytest.mark.parametrize("height, width", [(1024, 1024), (64, 128), (32, 64)])
def test_other_sizes_warn(height, width):
    warning = demo.request_warning(demo.EXAMPLE_PROMPT, height, width)
    assert warning.startswith("the demo model draws 64x64 images of") and f"{width}x{height}" in warning
    assert "\n" not in warning


def test_from_pretrained_without_a_path_is_the_demo(monkeypatch, caplog):
    monkeypatch.delenv("DITSERVE_DEFAULT_MODEL", raising=False)
    gen = Generator.from_pretrained(device="cpu")
    assert demo.is_demo(gen.engine.source.path)
    with caplog.at_level(logging.WARNING, logger="ditserve"):
        out = gen.generate(demo.EXAMPLE_PROMPT, seed=0, num_inference_steps=1)
        assert out.images[0].size == (64, 64) and not caplog.records
        gen.generate("a red fox in the snow", seed=0, num_inference_steps=1)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "the demo model draws 64x64 images" in caplog.records[0].getMessage()


def test_default_model_honours_the_override(monkeypatch, tmp_path):
    monkeypatch.setenv("DITSERVE_DEFAULT_MODEL", str(tmp_path))
    assert demo.default_model() == str(tmp_path) and demo.default_model("x/y") == "x/y"
    monkeypatch.delenv("DITSERVE_DEFAULT_MODEL")
    assert demo.default_model() == str(demo.MODEL_DIR) and not demo.is_demo(tmp_path)
