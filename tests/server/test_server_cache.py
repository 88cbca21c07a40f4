"""`serve --cache*`: the step cache's counts in the response timings, and the HTTP `cache` field
turning it off for one request (also through the official client's extra_body)."""

from __future__ import annotations

import httpx
from live_server import assert_envelope, start
from openai import OpenAI

PROMPT = "a red circle on the left, blue background"  # the demo model's form


def test_server_cache_flags_timings_and_per_request_opt_out(tmp_path):
    live = start(None, tmp_path / "server.log", "--cache", "first-block", "--cache-threshold", "0.3")
    try:
        body = {"prompt": PROMPT, "size": "64x64", "seed": 4}
        with httpx.Client(base_url=live.url, timeout=120) as client:
            on = client.post("/v1/images/generations", json=body).json()
            off = client.post("/v1/images/generations", json={**body, "cache": False}).json()
            bad = client.post("/v1/images/generations", json={**body, "cache": "sometimes"})
        assert on["timings"]["cache"]["method"] == "first-block" and on["timings"]["cache"]["skipped"] > 0
        assert off["timings"].get("cache") is None and on["data"][0]["b64_json"] != off["data"][0]["b64_json"]
        assert assert_envelope(bad, 400)["param"] == "cache"
        # the official client sends the extension through extra_body
        result = OpenAI(base_url=live.url + "/v1", api_key="unused").images.generate(
            model="ditserve-demo", prompt=PROMPT, size="64x64", extra_body={"seed": 4, "cache": False})
        assert result.data[0].b64_json == off["data"][0]["b64_json"]
    finally:
        live.stop()
