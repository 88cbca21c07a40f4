"""/v1/images/edits with Qwen-Image-Layered (tiny): an RGBA upload in, its RGBA layers out as PNGs
(alpha kept both ways), equal to the Python API; jpeg output (no alpha) is a 400."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from live_server import assert_envelope, start
from PIL import Image

FIELDS = {"prompt": "a cat on a mat", "negative_prompt": " ", "seed": "3", "num_inference_steps": "2",
          "size": "48x32", "layers": "2"}


@pytest.fixture(scope="module")
def layered_server(tiny_qwen_image_layered, tmp_path_factory):
    live = start(tiny_qwen_image_layered, tmp_path_factory.mktemp("layered") / "server.log")
    yield live
    live.stop()


def rgba_png() -> bytes:
    y, x = np.mgrid[0:30, 0:40] / 40
    rgba = np.stack([x, y, x * y, ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05) * 0.8 + 0.1], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray((rgba * 255).astype("uint8"), "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def test_edits_return_rgba_layers_equal_to_the_python_api(layered_server, tiny_qwen_image_layered):
    from ditserve import Generator

    with httpx.Client(base_url=layered_server.url, timeout=120) as client:
        r = client.post("/v1/images/edits", data=FIELDS | {"background": "transparent"},
                        files={"image": ("in.png", rgba_png(), "image/png")})
        assert r.status_code == 200, r.text
        served = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]
        bad = client.post("/v1/images/edits", data=FIELDS | {"output_format": "jpeg"},
                          files={"image": ("in.png", rgba_png(), "image/png")})
        opaque = client.post("/v1/images/edits", data=FIELDS | {"background": "opaque"},
                             files={"image": ("in.png", rgba_png(), "image/png")})
    assert [im.mode for im in served] == ["RGBA", "RGBA"]
    expected = Generator.from_pretrained(tiny_qwen_image_layered, device="cpu", dtype="float32").generate(
        "a cat on a mat", negative_prompt=" ", seed=3, num_inference_steps=2, height=32, width=48, layers=2,
        images=[Image.open(io.BytesIO(rgba_png()))]).images
    for s, e in zip(served, expected):
        assert np.array_equal(np.asarray(s), np.asarray(e))
    error = assert_envelope(bad, 400)
    assert error["param"] == "output_format" and "alpha" in error["message"]
    assert assert_envelope(opaque, 400)["param"] == "background"
