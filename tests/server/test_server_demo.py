"""`ditserve serve` with no flags: the bundled demo model, the server's default limits and Host policy."""

from __future__ import annotations

import base64
import io

import pytest
from live_server import assert_envelope, start
from PIL import Image

from ditserve import demo

PROMPT = demo.EXAMPLE_PROMPT


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory):
    if demo.model_path() is None:
        pytest.skip("the bundled demo model is not installed")
    live = start(None, tmp_path_factory.mktemp("demo") / "server.log")
    yield live
    live.stop()


def test_served_as_the_demo_by_the_servers_logger(demo_server):
    """Issue 23.12: the id names the demo (not its folder, "model"); the log lines are the server's."""
    models = demo_server.http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["ditserve-demo"]
    log = demo_server.log_path.read_text()
    assert "ditserve.cli.serve: no --model-path: serving the bundled demo model as 'ditserve-demo'" in log
    assert "ditserve.cli.generate" not in log


# the demo's defaults are 64x64 and 20 steps: 4x its image area, 80 steps and 4 images are the caps
DEFAULT_CAPS = [
    ({"size": "256x256"}, "size", "the limit is 16384"),
    ({"size": "128x144"}, "size", "the limit is 16384"),
    ({"num_inference_steps": 81}, "num_inference_steps", "between 1 and 80"),
    ({"n": 5}, "n", "between 1 and 4"),
]


@pytest.mark.parametrize("change,param,needle", DEFAULT_CAPS, ids=[p + str(c) for c, p, _ in DEFAULT_CAPS])
def test_default_caps_are_sized_from_the_model(demo_server, change, param, needle):
    """Issue 24.6: no 4096x4096, n=16 or 1000 steps unless the operator raises the caps."""
    before = demo_server.metrics()["ditserve_denoise_steps_total"]
    error = assert_envelope(demo_server.http.post("/v1/images/generations", json={"prompt": PROMPT, **change}), 400)
    assert error["param"] == param and needle in error["message"]
    assert demo_server.metrics()["ditserve_denoise_steps_total"] == before  # refused before model work


def test_within_the_default_caps(demo_server):
    response = demo_server.http.post("/v1/images/generations",
                                     json={"prompt": PROMPT, "size": "128x128", "n": 4, "seed": 1})
    assert response.status_code == 200, response.text
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in response.json()["data"]]
    assert [im.size for im in images] == [(128, 128)] * 4


def test_default_host_policy(demo_server):
    """Issue 24.4: the bound name and loopback names (and IP addresses) only; urls follow the Host."""
    port = demo_server.url.rsplit(":", 1)[1]
    error = assert_envelope(demo_server.http.get("/v1/models", headers={"Host": f"rebound.example:{port}"}), 400)
    assert error["code"] == "invalid_host" and "--allowed-hosts" in error["message"]
    body = {"prompt": PROMPT, "response_format": "url"}
    response = demo_server.http.post("/v1/images/generations", json=body, headers={"Host": f"localhost:{port}"})
    assert response.json()["data"][0]["url"].startswith(f"http://localhost:{port}/v1/images/img_")
