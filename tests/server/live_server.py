"""A real `ditserve serve` process on loopback, and small helpers to watch it from a test."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

API_KEY = "test-key"  # the shared server's
START_TIMEOUT_S = 180  # a harness limit for a busy 2-core machine, not an assertion on speed
_LISTENING = re.compile(r"on (http://127\.0\.0\.1:\d+)")

GOOD = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 2, "max_sequence_length": 16}
# Keeps the worker busy until its client goes away (thousands of steps, cancelled long before the end).
BLOCKER = {"prompt": "a long one", "size": "64x64", "num_inference_steps": 1000, "max_sequence_length": 16}


async def post(client: httpx.AsyncClient, body: dict) -> httpx.Response:
    return await client.post("/v1/images/generations", json=body)


async def occupy_worker(server, client: httpx.AsyncClient, body: dict = BLOCKER) -> asyncio.Task:
    """A request the worker is running (seen by its denoising steps), to cancel later."""
    steps = server.metrics()["ditserve_denoise_steps_total"]
    task = asyncio.create_task(post(client, body))
    await asyncio.to_thread(server.wait_metric, "ditserve_denoise_steps_total", lambda v: v > steps)
    return task


async def release(server, task: asyncio.Task) -> None:
    """Disconnect the blocker's client and wait until the server is idle again."""
    task.cancel()
    await asyncio.to_thread(server.wait_metric, "ditserve_running_requests", lambda v: v == 0)


class LiveServer:
    """`ditserve serve --port 0` in a subprocess; `url` once it is listening."""

    def __init__(self, model: Path | None, log_path: Path, *args: str, api_key: str | None = None):
        """`model` None: no --model-path, so the bundled demo model."""
        self.api_key = api_key
        self.log_path = log_path
        where = [] if model is None else ["--model-path", str(model)]
        cmd = [sys.executable, "-m", "ditserve.cli.main", "serve", *where, "--port", "0",
               "--device", "cpu", "--worker-threads", "1", *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.url = self._wait_for_url()
        self.http = httpx.Client(base_url=self.url, headers=self.headers, timeout=60)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.log_path.read_text())
            if match:
                return match[1]
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{self.log_text()}")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready:\n{self.log_text()}")

    def log_text(self) -> str:
        return self.log_path.read_text()[-5000:]

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples by name, labelled ones as name{k=v,...}."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return samples

    def wait_metric(self, name: str, predicate, timeout: float = 60) -> float:
        """Poll /metrics until `predicate(value)`; fails the test after `timeout` (a harness limit)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.metrics().get(name, 0.0)
            if predicate(value):
                return value
            time.sleep(0.02)
        raise AssertionError(f"{name} never satisfied the condition; last {value}\n{self.log_text()}")

    def worker(self) -> psutil.Process:
        """The worker child (multiprocessing spawn), not the resource tracker."""
        for child in psutil.Process(self.proc.pid).children():
            if "spawn_main" in " ".join(child.cmdline()):
                return child
        raise AssertionError("no worker process")

    def server_rss(self) -> int:
        """Resident memory of the server process alone (not its worker), in bytes."""
        return psutil.Process(self.proc.pid).memory_info().rss

    def rss(self) -> int:
        """Resident memory of the server process and its worker, in bytes."""
        return psutil.Process(self.proc.pid).memory_info().rss + self.worker().memory_info().rss

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start(model: Path | None, log_path: Path, *args: str, api_key: str | None = None) -> LiveServer:
    server = LiveServer(model, log_path, *args, api_key=api_key)
    try:
        server.wait_ready()
    except Exception:
        server.stop()
        raise
    return server


def assert_envelope(response: httpx.Response, status: int) -> dict:
    """The response is `status` with OpenAI's error envelope; returns the inner error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return error
