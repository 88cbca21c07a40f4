"""The official `openai` client against a real server: images, formats, urls, models, auth, edits."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from live_server import API_KEY, assert_envelope
from PIL import Image

TINY = {"num_inference_steps": 2, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_image_equals_python_api_for_the_same_seed(client, reference):
    result = client.images.generate(model="tiny-flux", prompt="a fox in snow", size="48x32",
                                    response_format="b64_json", extra_body={"seed": 3, **TINY})
    assert result.size == "48x32" and result.output_format == "png" and len(result.data) == 1
    extra = result.to_dict()
    assert extra["seed"] == 3
    assert set(extra["timings"]["stages"]) == {"encode_prompt", "prepare_latents", "timesteps", "denoise", "decode"}
    image = pixels(base64.b64decode(result.data[0].b64_json))
    expected = reference.generate("a fox in snow", seed=3, height=32, width=48, **TINY).images[0]
    assert np.array_equal(image, np.asarray(expected))


def test_raw_response_and_defaults(client):
    raw = client.images.with_raw_response.generate(prompt="a lake", size="32x32", extra_body=TINY)
    assert raw.status_code == 200 and raw.headers["content-type"] == "application/json"
    parsed = raw.parse()
    assert parsed.data[0].b64_json and parsed.data[0].url is None  # b64_json is the default
    assert isinstance(parsed.to_dict()["seed"], int)  # a seed is drawn and reported when none is given


def test_url_response_is_served_without_the_key(client, server):
    args = dict(prompt="owls", size="32x32", extra_body={"seed": 5, **TINY})
    by_url = client.images.generate(response_format="url", **args)
    by_b64 = client.images.generate(response_format="b64_json", **args)
    url = by_url.data[0].url
    assert url.startswith(f"{server.url}/v1/images/img_") and url.endswith("/content")
    fetched = httpx.get(url)  # no Authorization header: the random id is the capability
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert np.array_equal(pixels(fetched.content), pixels(base64.b64decode(by_b64.data[0].b64_json)))
    for bad in ("img_" + "0" * 32, "img_nothex", "..", "%2e%2e%2fetc%2fpasswd", "job_" + "a" * 32):
        assert_envelope(server.http.get(f"/v1/images/{bad}/content"), 404)


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(client, fmt, pil):
    result = client.images.generate(prompt="a boat", size="32x48", output_format=fmt, output_compression=80,
                                    extra_body=TINY)
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == pil and image.size == (32, 48) and result.output_format == fmt


def test_several_images_differ(client):
    result = client.images.generate(prompt="two cats", n=2, size="32x32", extra_body={"seed": 9, **TINY})
    a, b = (pixels(base64.b64decode(d.b64_json)) for d in result.data)
    assert a.shape == b.shape == (32, 32, 3) and not np.array_equal(a, b)


def test_compat_fields_are_accepted(client):
    result = client.images.generate(prompt="a tree", size="32x32", quality="high", style="natural",
                                    background="opaque", moderation="low", user="u-1", stream=False,
                                    partial_images=0, extra_body=TINY)
    assert len(result.data) == 1


def test_ignored_fields_are_documented_as_ignored(server):
    """Issue 23.14: what OpenAI clients may send and ditserve does not do is documented as ignored;
    a value that asks for something impossible (a transparent background) is a 400 (test_server_invalid)."""
    fields = server.http.get("/openapi.json").json()["components"]["schemas"]["ImageGenerationBody"]["properties"]
    for name in ("quality", "style", "moderation", "user", "safety_identifier"):
        assert fields[name]["description"].startswith("Ignored"), name
    assert "transparent is refused" in fields["background"]["description"]


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny-flux"]
    assert client.models.retrieve("tiny-flux").owned_by == "ditserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="gpt-image-1", prompt="x", size="32x32")
    assert info.value.code == "model_not_found" and "tiny-flux" in info.value.message


def test_wrong_or_missing_key_is_401(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.images.generate(prompt="x", size="32x32")
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert_envelope(httpx.get(f"{server.url}/v1/models"), 401)
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def test_edits_are_refused_clearly(client):
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG")
    with pytest.raises(openai.BadRequestError) as info:
        client.images.edit(image=("in.png", buffer.getvalue(), "image/png"), prompt="make it red")
    assert info.value.status_code == 400 and "does not edit images" in info.value.message


def test_metrics_exposition(server, client):
    client.images.generate(prompt="a hill", size="32x32", extra_body=TINY)
    samples = server.metrics()
    assert samples['ditserve_requests_total{route=/v1/images/generations,status=200}'] >= 1
    for name in ("ditserve_queue_length", "ditserve_running_requests", "ditserve_worker_ready",
                 "ditserve_queue_time_seconds_count", "ditserve_stage_seconds_count{stage=denoise}",
                 "ditserve_request_latency_seconds_count{route=/v1/images/generations}"):
        assert name in samples, name
    assert samples["ditserve_worker_ready"] == 1
