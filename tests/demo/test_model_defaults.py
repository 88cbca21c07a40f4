"""A model folder's own request defaults (`ditserve.json`), read by the loader, used by Engine and CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve import Generator
from ditserve.api import GenerationRequest, InvalidRequest, RequestDefaults
from ditserve.cli.main import main
from ditserve.pipelines.flux import FluxPipeline
from ditserve.runtime.loader import MODEL_DEFAULTS_FILE, inspect_model, read_model_defaults

SMALL = {"height": 32, "width": 48, "num_inference_steps": 2, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def model_with_defaults(tiny_flux_schnell, tmp_path_factory):
    path = tmp_path_factory.mktemp("with_defaults") / "model"
    shutil.copytree(tiny_flux_schnell, path)
    (path / MODEL_DEFAULTS_FILE).write_text(json.dumps({"defaults": SMALL}))
    return path


def test_defaults_file_overrides_the_family(model_with_defaults, tiny_flux_schnell):
    source = inspect_model(model_with_defaults)
    expected = RequestDefaults(**{**FluxPipeline.defaults.__dict__, **SMALL})
    assert source.defaults == expected
    assert inspect_model(tiny_flux_schnell).defaults == FluxPipeline.defaults  # no file: the family's


@pytest.mark.parametrize("content, needle", [
    ("{not json", "malformed"),
    ("[1, 2]", "malformed"),
    ('{"defaults": [64]}', "must be an object"),
    ('{"defaults": {"heigth": 64}}', "unknown defaults ['heigth']"),
    ('{"defaults": {"height": 64.5}}', "height must be an integer"),
    ('{"defaults": {"num_inference_steps": true}}', "num_inference_steps must be an integer"),
    ('{"defaults": {"guidance_scale": "high"}}', "guidance_scale must be a finite number"),
])
def test_bad_defaults_file_is_a_clear_error(tmp_path, content, needle):
    (tmp_path / MODEL_DEFAULTS_FILE).write_text(content)
    with pytest.raises(InvalidRequest) as err:
        read_model_defaults(tmp_path, RequestDefaults())
    assert needle in str(err.value) and MODEL_DEFAULTS_FILE in str(err.value)


def test_float_default_accepts_an_integer(tmp_path):
    (tmp_path / MODEL_DEFAULTS_FILE).write_text('{"defaults": {"guidance_scale": 2}}')
    got = read_model_defaults(tmp_path, RequestDefaults())
    assert got.guidance_scale == 2.0 and isinstance(got.guidance_scale, float)


def test_engine_uses_the_model_defaults(model_with_defaults):
    gen = Generator.from_pretrained(model_with_defaults, device="cpu", dtype=torch.float32)
    out = gen.generate("a mountain lake", seed=0)
    assert np.asarray(out.images[0]).shape == (32, 48, 3)
    assert len(out.timings.steps) == 2
    resolved = gen.engine.resolve(GenerationRequest("a lake"))
    assert (resolved.height, resolved.width, resolved.max_sequence_length) == (32, 48, 16)
    explicit = gen.generate("a mountain lake", seed=0, height=48, width=32, num_inference_steps=1)
    assert np.asarray(explicit.images[0]).shape == (48, 32, 3)


def test_cli_uses_the_model_defaults(model_with_defaults, tmp_path):
    out = tmp_path / "img.png"
    assert main(["generate", "--model-path", str(model_with_defaults), "--prompt", "owls", "--seed", "1",
                 "--device", "cpu", "--output", str(out)]) == 0
    assert Image.open(out).size == (48, 32)
