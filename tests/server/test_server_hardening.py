"""A server configured as for a public deployment: caps below the model's defaults, a per-client limit,
a Host allow-list and public URL, a bounded output folder, and bounds on slow or numerous connections."""

from __future__ import annotations

import asyncio
import socket
import stat
import time

import httpx
import pytest
from live_server import assert_envelope, start

HEADER_TIMEOUT_S = 2
MAX_CONNECTIONS = 12
OUTPUT_MAX_BYTES = 40_000
PUBLIC = "https://images.example.test/base"
TINY = {"prompt": "a fox", "max_sequence_length": 16}


@pytest.fixture(scope="module")
def hardened(tiny_flux_dev, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardened")
    live = start(tiny_flux_dev, folder / "server.log",
                 "--max-steps", "3", "--max-pixels", "4096",  # the model's defaults: 28 steps, 1024x1024
                 "--max-queue", "8", "--max-client-requests", "2",
                 "--allowed-hosts", "images.example.test", "--public-url", PUBLIC,
                 "--output-dir", str(folder / "out"), "--output-max-bytes", str(OUTPUT_MAX_BYTES),
                 "--header-timeout", str(HEADER_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS))
    live.output_dir = folder / "out"
    yield live
    live.stop()


def steps_run(server) -> float:
    return server.metrics()["ditserve_denoise_steps_total"]


# -- issue 24.1: defaults under the operator's caps --------------------------------------------

def test_defaults_fit_the_caps(hardened):
    """--max-steps 3 and --max-pixels 4096 are below the model's defaults (28 steps, 1024x1024): a
    request that sends neither runs at the caps instead of failing."""
    before = steps_run(hardened)
    response = hardened.http.post("/v1/images/generations", json=TINY)
    assert response.status_code == 200, response.text
    assert response.json()["size"] == "64x64"
    assert steps_run(hardened) - before == 3
    error = assert_envelope(hardened.http.post("/v1/images/generations", json={**TINY, "num_inference_steps": 4}),
                            400)
    assert error["param"] == "num_inference_steps" and "between 1 and 3" in error["message"]
    assert "default num_inference_steps lowered from 28 to 3" in hardened.log_path.read_text()


# -- issue 24.6: one client cannot take the whole queue ----------------------------------------

def test_per_client_limit(hardened):
    """Two requests in flight per client address (as a trusted local proxy forwards it); a third is 429,
    while another client is still queued."""
    worker = hardened.worker()

    async def scenario():
        async with httpx.AsyncClient(base_url=hardened.url, timeout=120) as client:
            def post(address, seed):
                return client.post("/v1/images/generations", json={**TINY, "seed": seed},
                                   headers={"X-Forwarded-For": address})

            worker.suspend()  # everything stays queued or running until it resumes
            try:
                mine = [asyncio.create_task(post("10.0.0.1", s)) for s in (1, 2)]
                await asyncio.to_thread(hardened.wait_metric, "ditserve_queue_length", lambda v: v == 1)
                third = await post("10.0.0.1", 3)
                other = asyncio.create_task(post("10.0.0.2", 4))
                await asyncio.to_thread(hardened.wait_metric, "ditserve_queue_length", lambda v: v == 2)
            finally:
                worker.resume()
            return third, await asyncio.gather(*mine, other)

    third, served = asyncio.run(scenario())
    error = assert_envelope(third, 429)
    assert error["code"] == "client_limit" and "limit per client is 2" in error["message"]
    assert int(third.headers["retry-after"]) >= 1
    assert [r.status_code for r in served] == [200, 200, 200]


# -- issue 24.4: Host allow-list and the public URL -------------------------------------------

def test_host_allow_list(hardened):
    port = hardened.url.rsplit(":", 1)[1]
    for host in ("evil.example", "localhost", f"images.example.test.evil.example:{port}"):
        error = assert_envelope(hardened.http.get("/health", headers={"Host": host}), 400)
        assert error["code"] == "invalid_host", host
    for host in (f"images.example.test:{port}", "IMAGES.example.test", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert hardened.http.get("/health", headers={"Host": host}).status_code == 200, host


def test_urls_use_the_public_url(hardened):
    body = {**TINY, "response_format": "url", "size": "32x32"}
    response = hardened.http.post("/v1/images/generations", json=body, headers={"Host": "images.example.test"})
    url = response.json()["data"][0]["url"]
    assert url.startswith(f"{PUBLIC}/v1/images/img_") and url.endswith("/content")
    path = url.removeprefix(PUBLIC)
    assert hardened.http.get(path).status_code == 200


# -- issue 24.8: a private, bounded output folder ---------------------------------------------

def test_output_folder_is_private_and_bounded(hardened):
    urls = []
    for seed in range(8):
        response = hardened.http.post("/v1/images/generations",
                                      json={**TINY, "n": 4, "seed": seed, "response_format": "url"})
        assert response.status_code == 200, response.text
        urls += [d["url"].removeprefix(PUBLIC) for d in response.json()["data"]]
    files = list(hardened.output_dir.iterdir())
    assert stat.S_IMODE(hardened.output_dir.stat().st_mode) == 0o700
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert sum(f.stat().st_size for f in files) <= OUTPUT_MAX_BYTES
    assert len(files) < len(urls)  # 32 images of 64x64 do not fit: the oldest went first
    assert_envelope(hardened.http.get(urls[0]), 404)
    assert hardened.http.get(urls[-1]).status_code == 200


# -- issue 24.5: slow and numerous connections ------------------------------------------------

def raw_connection(server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=HEADER_TIMEOUT_S * 5)


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_stalled_headers_get_408(hardened):
    with raw_connection(hardened) as stalled, raw_connection(hardened) as idle:
        start = time.monotonic()
        stalled.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        answer = read_until_closed(stalled)  # the socket timeout (5x the header timeout) fails the test
        elapsed = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"code": "header_timeout"' in answer
        assert HEADER_TIMEOUT_S * 0.9 <= elapsed < HEADER_TIMEOUT_S * 4
        assert read_until_closed(idle) == b""  # connected, sent nothing: closed without an answer


def test_connection_limit_answers_503(hardened):
    """Connections beyond --max-connections get a 503 at once; stalled ones are dropped at the header
    timeout, after which the server answers again."""
    stalled = [raw_connection(hardened) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in stalled:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        refused = httpx.get(f"{hardened.url}/health", timeout=10)
        error = assert_envelope(refused, 503)
        assert error["code"] == "too_many_connections" and refused.headers["retry-after"] == "1"
        answers = [read_until_closed(sock) for sock in stalled]
    finally:
        for sock in stalled:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)
    assert httpx.get(f"{hardened.url}/health", timeout=10).status_code == 200


def test_many_stalled_connections_are_all_dropped(hardened):
    """The probe's scenario, scaled down: 200 connections stalled mid-headers hold nothing for long."""
    async def scenario():
        host, port = hardened.url.removeprefix("http://").split(":")

        async def stall():
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /health HTTP/1.1\r\nHo")
            start = time.monotonic()
            await asyncio.wait_for(reader.read(), HEADER_TIMEOUT_S * 10)  # until the server closes it
            writer.close()
            return time.monotonic() - start

        return await asyncio.gather(*[stall() for _ in range(200)])

    held = asyncio.run(scenario())
    assert max(held) < HEADER_TIMEOUT_S * 5
    assert hardened.http.get("/health").status_code == 200
