"""Request timeout, SIGTERM drain, and `ditserve serve`'s refusals before it listens."""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from live_server import GOOD, assert_envelope, occupy_worker, post, start

from ditserve.cli.main import main

TIMEOUT_S = 5


@pytest.fixture(scope="module")
def short_server(tiny_flux_dev, tmp_path_factory):
    live = start(tiny_flux_dev, tmp_path_factory.mktemp("short") / "server.log",
                 "--request-timeout", str(TIMEOUT_S), "--max-batch-size", "1", "--max-steps", "1000")
    yield live
    live.stop()


def test_timeout_is_504_and_the_work_stops(short_server):
    stopped = short_server.metrics()["ditserve_stopped_runs_total"]
    endless = {**GOOD, "size": "512x512", "num_inference_steps": 1000}  # far longer than the timeout
    error = assert_envelope(short_server.http.post("/v1/images/generations", json=endless), 504)
    assert error["code"] == "timeout" and f"{TIMEOUT_S} s" in error["message"]
    short_server.wait_metric("ditserve_stopped_runs_total", lambda v: v == stopped + 1)
    assert short_server.http.post("/v1/images/generations", json=GOOD).status_code == 200


def test_sigterm_drains_then_exits_0(short_server):
    """Runs last in this module: the server is gone afterwards."""
    async def scenario():
        async with httpx.AsyncClient(base_url=short_server.url, timeout=60) as client:
            running = await occupy_worker(short_server, client, {**GOOD, "num_inference_steps": 300})
            short_server.proc.send_signal(signal.SIGTERM)
            while (ready := await client.get("/ready")).status_code == 200:
                await asyncio.sleep(0.01)
            refused = await post(client, GOOD)
            return ready, refused, await running

    ready, refused, finished = asyncio.run(scenario())
    assert assert_envelope(ready, 503)["code"] == "draining"
    assert assert_envelope(refused, 503)["code"] == "unavailable" and int(refused.headers["retry-after"]) >= 1
    assert finished.status_code == 200 and len(finished.json()["data"]) == 1  # in flight: finished
    assert short_server.proc.wait(60) == 0


BAD_FLAGS = [
    (["--model-path", "/nonexistent/model"], "does not exist"),
    (["--max-queue", "0"], "max_queue must be positive"),
    (["--request-timeout", "-1"], "request_timeout_s must be positive"),
    (["--max-batch-size", "0"], "--max-batch-size"),
    (["--port", "70000"], "port must be between"),
    (["--api-key-file", "/nonexistent/key"], "cannot read --api-key-file"),
    (["--api-key", "a", "--api-key-file", "/etc/hostname"], "not both"),
    (["--device", "tpu"], "unsupported device"),
    # caps no request could meet (the model's smallest image is 16x16)
    (["--max-pixels", "100"], "--max-pixels 100 is below this model's smallest image"),
    (["--max-connections", "0"], "max_connections must be positive"),
    (["--header-timeout", "0"], "header_timeout_s must be positive"),
    (["--max-client-requests", "0"], "max_client_requests must be positive"),
    (["--output-max-bytes", "0"], "output_max_bytes must be positive"),
    (["--data-max-bytes", "0"], "data_max_bytes must be positive"),
    (["--public-url", "ftp://example.com"], "public_url must be an http(s) URL"),
    (["--allowed-hosts", ","], "allowed_hosts is empty"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=[f[0] for f, _ in BAD_FLAGS])
def test_bad_flags_exit_2_before_listening(tiny_flux_dev, capsys, flags, needle):
    args = ["serve", "--model-path", str(tiny_flux_dev), "--port", "0", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_step_cap_below_the_models_minimum_exits_2(tiny_qwen_image_edit, capsys):
    """Its scheduler ends at a terminal sigma, so it needs 2 steps: --max-steps 1 could serve nothing."""
    assert main(["serve", "--model-path", str(tiny_qwen_image_edit), "--port", "0", "--max-steps", "1"]) == 2
    assert "--max-steps 1 is below this model's minimum of 2 steps" in capsys.readouterr().err


def test_taken_port_exits_2(tiny_flux_dev, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model-path", str(tiny_flux_dev), "--port", str(port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_unloadable_weights_exit_1(tiny_flux_dev, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_flux_dev, broken)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    res = subprocess.run([sys.executable, "-m", "ditserve.cli.main", "serve", "--model-path", str(broken),
                          "--port", "0", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "ditserve: failed: the model could not be loaded" in res.stderr
