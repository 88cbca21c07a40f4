"""One shared `ditserve serve` for the server tests; modules that need other flags start their own."""

from __future__ import annotations

import pytest

from live_server import API_KEY, LiveServer, start

# Loose caps and a small queue: the overload, batching, cancellation and crash tests need long runs
# (1000 steps) and fill the whole queue from one client.
MAIN_FLAGS = ("--max-queue", "4", "--max-batch-size", "4", "--request-timeout", "120",
              "--served-model-name", "tiny-flux", "--max-steps", "1000", "--max-client-requests", "64")


@pytest.fixture(scope="session")
def server(tiny_flux_dev, tmp_path_factory) -> LiveServer:
    log = tmp_path_factory.mktemp("server") / "server.log"
    live = start(tiny_flux_dev, log, *MAIN_FLAGS, api_key=API_KEY)
    yield live
    live.stop()


@pytest.fixture(scope="session")
def reference(tiny_flux_dev):
    """The Python API on the same checkpoint, in this process: what the server must reproduce."""
    from ditserve import Generator

    return Generator.from_pretrained(tiny_flux_dev, device="cpu", dtype="float32")
