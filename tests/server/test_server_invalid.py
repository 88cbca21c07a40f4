"""Every bad request gets a 400 (never 422) in OpenAI's envelope, before model work; the server keeps serving."""

from __future__ import annotations

import json

import pytest
from live_server import assert_envelope

GOOD = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 2, "max_sequence_length": 16}

# (changes to GOOD, the `param` the envelope must name, a word its message must contain)
BAD_FIELDS = [
    ({"prompt": None}, "prompt", "prompt"),
    ({"prompt": ""}, "prompt", "prompt"),
    ({"prompt": "   "}, "prompt", "prompt"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": "x" * 10_001}, "prompt", "limit"),
    ({"prompt": "\ud800 lone surrogate"}, "prompt", "prompt"),
    ({"negative_prompt": "\udfff", "true_cfg_scale": 2}, "negative_prompt", "surrogate"),
    ({"n": 0}, "n", "n"),
    ({"n": 17}, "n", "between"),
    ({"n": "2"}, "n", "integer"),
    ({"n": 1.5}, "n", "integer"),
    ({"n": True}, "n", "integer"),
    ({"size": "33x32"}, "size", "multiple of 16"),
    ({"size": "32"}, "size", "WIDTHxHEIGHT"),
    ({"size": "-32x32"}, "size", "WIDTHxHEIGHT"),
    ({"size": "0x0"}, "size", "between"),
    ({"size": "99984x99984"}, "size", "between"),
    ({"size": 1024}, "size", "string"),
    ({"num_inference_steps": 0}, "num_inference_steps", "num_inference_steps"),
    ({"num_inference_steps": 1001}, "num_inference_steps", "between"),
    ({"guidance_scale": -1}, "guidance_scale", "guidance_scale"),
    ({"guidance_scale": "high"}, "guidance_scale", "number"),
    ({"true_cfg_scale": -2}, "true_cfg_scale", "true_cfg_scale"),
    ({"seed": -1}, "seed", "seed"),
    ({"seed": 2**64}, "seed", "seed"),
    ({"max_sequence_length": 4096}, "max_sequence_length", "between"),
    ({"response_format": "file"}, "response_format", "b64_json"),
    ({"output_format": "gif"}, "output_format", "png"),
    ({"output_compression": 101}, "output_compression", "100"),
    ({"quality": "ultra"}, "quality", "auto"),
    ({"background": "transparent"}, "background", "transparent"),
    ({"style": "cubist"}, "style", "vivid"),
    ({"stream": True}, "stream", "not supported"),
    ({"partial_images": 2}, "partial_images", "not supported"),
    ({"image_path": "/etc/passwd"}, "image_path", "Unrecognized"),
    ({"sampler": "ddim"}, "sampler", "euler"),
    ({"flow_shift": 0}, "flow_shift", "flow_shift"),
    ({"flow_shift": "big"}, "flow_shift", "number"),
    ({"num_frames": 9}, "num_frames", "Unrecognized"),  # an image model takes no video fields
]


def post_bad(server, change: dict):
    """GOOD with `change` applied (None deletes a field), sent as JSON."""
    body = {k: v for k, v in {**GOOD, **change}.items() if v is not None}
    content = json.dumps(body, ensure_ascii=True)  # ensure_ascii lets a lone surrogate through as \ud800
    return server.http.post("/v1/images/generations", content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize("change,param,needle", BAD_FIELDS, ids=[f"{p}:{str(c)[:30]}" for c, p, _ in BAD_FIELDS])
def test_bad_field_is_400_envelope(server, change, param, needle):
    error = assert_envelope(post_bad(server, change), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert needle.lower() in error["message"].lower()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"a string"', "", "null", '{"prompt": NaN}'],
                         ids=["broken", "array", "string", "empty", "null", "nan"])
def test_bad_json_is_400_envelope(server, content):
    response = server.http.post("/v1/images/generations", content=content,
                                headers={"content-type": "application/json"})
    assert_envelope(response, 400)


def test_missing_prompt_names_it(server):
    error = assert_envelope(server.http.post("/v1/images/generations", json={"size": "32x32"}), 400)
    assert error["param"] == "prompt" and error["code"] == "missing_required_parameter"


def test_oversized_body_is_413(server):
    big = {**GOOD, "prompt": "x" * (1 << 20)}
    error = assert_envelope(server.http.post("/v1/images/generations", json=big), 413)
    assert error["code"] == "request_too_large"


def test_oversized_chunked_body_is_413(server):
    def chunks():
        for _ in range(20):
            yield b"x" * 65536 * 2

    response = server.http.post("/v1/images/generations", content=chunks(),
                                headers={"content-type": "application/json"})
    assert_envelope(response, 413)


def test_unknown_route_and_method(server):
    assert assert_envelope(server.http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert assert_envelope(server.http.get("/v1/images/generations"), 405)["code"] == "method_not_allowed"


def test_no_model_work_and_still_healthy(server):
    """Bad requests never reached the worker: it ran no steps for them, and good requests still work."""
    before = server.metrics()["ditserve_denoise_steps_total"]
    for change, _, _ in BAD_FIELDS:
        assert post_bad(server, change).status_code == 400
    assert server.metrics()["ditserve_denoise_steps_total"] == before
    assert server.http.get("/health").status_code == 200
    ok = server.http.post("/v1/images/generations", json=GOOD)
    assert ok.status_code == 200 and len(ok.json()["data"]) == 1


def test_empty_body_says_so(server):
    """Issue 24.9: not "Missing required parameter: 'None'"."""
    response = server.http.post("/v1/images/generations", content=b"", headers={"content-type": "application/json"})
    error = assert_envelope(response, 400)
    assert "None" not in error["message"] and "empty" in error["message"] and "prompt" in error["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(server, content_type):
    """Issue 23.7: a JSON route names the content type it expects, before reading the body."""
    headers = {"content-type": content_type} if content_type else {}
    response = server.http.post("/v1/images/generations", content=json.dumps(GOOD), headers=headers)
    error = assert_envelope(response, 415)
    assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    assert server.http.post("/v1/images/generations", content=json.dumps(GOOD),
                            headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_edits_expect_a_form(server):
    error = assert_envelope(server.http.post("/v1/images/edits", json={"prompt": "x"}), 415)
    assert "multipart/form-data" in error["message"]


def test_probes_answer_head(server):
    """Issue 24.9: load balancers probe with HEAD."""
    for path in ("/health", "/ready"):
        response = server.http.head(path)
        assert response.status_code == 200 and response.content == b"", path


def test_openapi_declares_the_key_and_the_size_pattern(server):
    schema = server.http.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": "the server's --api-key, as 'Authorization: Bearer KEY'"}
    paths = schema["paths"]
    assert paths["/v1/images/generations"]["post"]["security"] == [{"bearerAuth": []}]
    assert paths["/v1/models"]["get"]["security"] == [{"bearerAuth": []}]
    assert "security" not in paths["/v1/images/{image_id}/content"]["get"]  # the id is the capability
    assert "security" not in paths["/health"]["get"]
    size = schema["components"]["schemas"]["ImageGenerationBody"]["properties"]["size"]["anyOf"][0]
    assert size["pattern"] == r"^(auto|\d{1,5}x\d{1,5})$"


def test_docs_page_works_offline(server):
    """Issue 24.9: /docs is plain HTML from this server, no scripts or assets from a CDN."""
    response = server.http.get("/docs")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert "POST /v1/images/generations" in page and "num_inference_steps" in page
    assert server.http.get("/redoc").status_code == 404


def test_video_routes_on_an_image_model_are_400(server):
    """Issue 14: an image model answers /v1/videos with a 400 that says it makes images."""
    for response in (server.http.post("/v1/videos", data={"prompt": "a cat walks"}),
                     server.http.post("/v1/videos", json={"prompt": "a cat walks"}),
                     server.http.get("/v1/videos"), server.http.get("/v1/videos/video_" + "0" * 32)):
        error = assert_envelope(response, 400)
        assert error["param"] == "model" and "makes images" in error["message"], error
