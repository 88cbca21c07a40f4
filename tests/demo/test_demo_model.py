"""The bundled demo model: a real diffusers checkpoint that draws what it is asked, and the default model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve import Generator, demo
from ditserve.cli.generate import default_model_path
from ditserve.cli.main import main
from training.demo import config
from training.demo.evaluate import evaluate, held_out_combos
from training.demo.scenes import split_combos

MODEL = demo.MODEL_DIR
NUM_PROMPTS = 24
MAX_MODEL_BYTES = 20 * 1024 * 1024


@pytest.fixture(scope="module")
def generator():
    return Generator.from_pretrained(MODEL, device="cpu", dtype=torch.float32)


def test_layout_size_and_defaults():
    assert demo.model_path() == MODEL
    index = json.loads((MODEL / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for component in ("scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "vae", "transformer"):
        assert (MODEL / component).is_dir(), component
    files = [f for f in MODEL.rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(f.suffix == ".safetensors" for f in weights)
    assert sum(f.stat().st_size for f in files) <= MAX_MODEL_BYTES
    defaults = json.loads((MODEL / "ditserve.json").read_text())["defaults"]
    assert (defaults["height"], defaults["width"]) == (64, 64)


@pytest.mark.parametrize("prompt, seed", [("a red circle on the left, blue background", 0),
                                          ("a white triangle on the top, black background", 7),
                                          ("a photo of a cat", 3)])
def test_same_image_as_diffusers(generator, prompt, seed):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    d = config.REQUEST_DEFAULTS
    ref = pipe(prompt, height=d["height"], width=d["width"], num_inference_steps=d["num_inference_steps"],
               guidance_scale=d["guidance_scale"], max_sequence_length=d["max_sequence_length"],
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    expected = (ref * 255).round().astype(np.uint8)
    got = np.asarray(generator.generate(prompt, seed=seed).images[0])  # the model's own defaults
    assert got.shape == expected.shape == (64, 64, 3)
    assert expected.std() > 10
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_draws_held_out_prompts(generator):
    combos = held_out_combos(NUM_PROMPTS)
    train, _ = split_combos(config.SEED, config.NUM_HELD_OUT)
    assert len(combos) >= 20 and not {c.caption for c in combos} & {c.caption for c in train}
    report = evaluate(generator, combos, seeds=(0,))
    assert report.accuracy >= 0.9, report.summary()


def test_default_model_path(monkeypatch, tmp_path):
    monkeypatch.delenv("DITSERVE_DEFAULT_MODEL", raising=False)
    assert default_model_path(None) == str(MODEL)
    assert default_model_path("some/model") == "some/model"
    monkeypatch.setenv("DITSERVE_DEFAULT_MODEL", str(tmp_path))
    assert default_model_path(None) == str(tmp_path)


def test_generate_without_model_path(monkeypatch, tmp_path):
    monkeypatch.delenv("DITSERVE_DEFAULT_MODEL", raising=False)
    out = tmp_path / "demo.png"
    assert main(["generate", "--prompt", demo.EXAMPLE_PROMPT, "--seed", "0", "--device", "cpu",
                 "--output", str(out)]) == 0
    image = Image.open(out)
    assert image.size == (64, 64) and np.asarray(image).std() > 10
