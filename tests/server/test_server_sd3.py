"""`ditserve serve` on an SD3.5-Medium-style folder: /v1/images/generations (with skip-layer guidance)
gives the Python API's pixels; bad skip-layer input is 400 before any model work."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from live_server import assert_envelope, start
from PIL import Image

BODY = {"prompt": "a mountain lake", "size": "48x32", "num_inference_steps": 3, "max_sequence_length": 16,
        "guidance_scale": 4.0, "negative_prompt": "fog", "seed": 8, "skip_guidance_layers": [1],
        "skip_layer_guidance_start": 0.0, "skip_layer_guidance_stop": 0.7}


@pytest.fixture(scope="module")
def sd3_server(tiny_sd3, tmp_path_factory):
    live = start(tiny_sd3("sd35m"), tmp_path_factory.mktemp("sd3") / "server.log")
    yield live
    live.stop()


def test_generation_equals_python_api(sd3_server, tiny_sd3):
    from ditserve import Generator

    response = sd3_server.http.post("/v1/images/generations", json=BODY)
    assert response.status_code == 200, response.text
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"]))).convert("RGB"))
    kwargs = {k: v for k, v in BODY.items() if k not in ("prompt", "size")}
    expected = Generator.from_pretrained(tiny_sd3("sd35m"), device="cpu", dtype="float32").generate(
        BODY["prompt"], height=32, width=48, **kwargs).images[0]
    # the worker runs with its own thread count: a .5 may round the other way
    assert np.abs(served.astype(int) - np.asarray(expected).astype(int)).max() <= 1


@pytest.mark.parametrize("change,param,needle", [
    ({"skip_guidance_layers": [3]}, "skip_guidance_layers", "block indices 0...2"),
    ({"skip_guidance_layers": []}, "skip_guidance_layers", "at least 1"),
    ({"skip_layer_guidance_scale": -2}, "skip_layer_guidance_scale", "greater than or equal to 0"),
    ({"size": "144x64"}, "size", "between 16 and 128"),
])
def test_bad_input_is_400(sd3_server, change, param, needle):
    before = sd3_server.metrics()["ditserve_denoise_steps_total"]
    error = assert_envelope(sd3_server.http.post("/v1/images/generations", json={**BODY, **change}), 400)
    assert error["param"] == param and needle in error["message"], error
    assert sd3_server.metrics()["ditserve_denoise_steps_total"] == before
