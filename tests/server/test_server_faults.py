"""Client disconnects and a killed worker: work stops, nothing leaks, the server recovers."""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
from live_server import BLOCKER, GOOD, assert_envelope, occupy_worker, post
from PIL import Image

MIB = 1 << 20


def counters(server) -> tuple[float, float, float]:
    m = server.metrics()
    return m["ditserve_denoise_steps_total"], m["ditserve_cancelled_requests_total"], m["ditserve_stopped_runs_total"]


async def abort_mid_generation(server, client: httpx.AsyncClient, cancelled_before: float) -> None:
    """Start a long request, disconnect once the worker runs it, wait until the server cancelled it."""
    task = await occupy_worker(server, client)
    task.cancel()
    await asyncio.to_thread(server.wait_metric, "ditserve_cancelled_requests_total",
                            lambda v: v == cancelled_before + 1)
    await asyncio.to_thread(server.wait_metric, "ditserve_running_requests", lambda v: v == 0)


def test_disconnect_stops_the_run(server):
    steps0, cancelled0, stopped0 = counters(server)

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            await abort_mid_generation(server, client, cancelled0)

    asyncio.run(scenario())
    steps1, cancelled1, stopped1 = counters(server)
    assert (cancelled1, stopped1) == (cancelled0 + 1, stopped0 + 1)  # the worker stopped the run early
    assert 0 < steps1 - steps0 < BLOCKER["num_inference_steps"]
    assert counters(server)[0] == steps1  # and it runs no more steps for it
    assert server.http.post("/v1/images/generations", json=GOOD).status_code == 200


def test_hundred_aborts_leave_no_trace(server):
    """100 requests aborted mid-generation, four at a time (a running batch and the queue behind it)."""
    async def waves(count: int):
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            for _ in range(count):
                cancelled = counters(server)[1]
                first = await occupy_worker(server, client)
                rest = [asyncio.create_task(post(client, {**BLOCKER, "seed": i})) for i in range(3)]
                await asyncio.to_thread(server.wait_metric, "ditserve_queue_length", lambda v: v > 0)
                for task in (first, *rest):
                    task.cancel()
                await asyncio.to_thread(server.wait_metric, "ditserve_cancelled_requests_total",
                                        lambda v, c=cancelled: v == c + 4)
                await asyncio.to_thread(server.wait_metric, "ditserve_running_requests", lambda v: v == 0)

    asyncio.run(waves(3))  # warm-up: allocator pools, lazily built caches
    rss_before = server.rss()
    steps0, cancelled0, stopped0 = counters(server)
    asyncio.run(waves(25))
    steps1, cancelled1, stopped1 = counters(server)
    assert cancelled1 - cancelled0 == 100
    assert stopped1 - stopped0 >= 25  # every wave's running batch stopped between steps
    assert steps1 - steps0 < 25 * BLOCKER["num_inference_steps"]
    m = server.metrics()
    assert m["ditserve_queue_length"] == 0 and m["ditserve_running_requests"] == 0
    growth = server.rss() - rss_before
    assert growth < 16 * MIB, f"server and worker grew by {growth / MIB:.1f} MiB over 100 aborts"


def test_killed_worker_fails_fast_and_recovers(server, reference):
    restarts0 = server.metrics()["ditserve_worker_restarts_total"]
    old = server.worker()
    steps0 = counters(server)[0]

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            task = await occupy_worker(server, client)
            old.kill()
            response = await task
            ready = await client.get("/ready")
            return response, ready

    response, ready = asyncio.run(scenario())
    error = assert_envelope(response, 500)
    assert error["code"] == "worker_died" and "SIGKILL" in error["message"]
    assert counters(server)[0] - steps0 < BLOCKER["num_inference_steps"]  # failed without running to the end
    assert assert_envelope(ready, 503)["code"] == "not_ready"  # while the new worker loads
    server.wait_ready()
    assert server.worker().pid != old.pid
    assert server.metrics()["ditserve_worker_restarts_total"] == restarts0 + 1
    ok = server.http.post("/v1/images/generations", json={**GOOD, "seed": 4})
    assert ok.status_code == 200
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(ok.json()["data"][0]["b64_json"]))))
    expected = reference.generate("a fox", seed=4, height=32, width=32, num_inference_steps=2, max_sequence_length=16)
    assert np.array_equal(image, np.asarray(expected.images[0]))


def test_queued_requests_survive_a_worker_crash(server):
    """Requests waiting behind the crashed batch are not failed: the new worker serves them."""
    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            task = await occupy_worker(server, client)
            queued = asyncio.create_task(post(client, {**GOOD, "size": "48x48"}))
            await asyncio.to_thread(server.wait_metric, "ditserve_queue_length", lambda v: v == 1)
            server.worker().kill()
            return await task, await queued

    crashed, queued = asyncio.run(scenario())
    assert crashed.status_code == 500 and queued.status_code == 200
    server.wait_ready()


def test_request_sent_as_the_worker_dies_is_served_by_the_next(server):
    """A batch the worker never took (it was stopped, then killed, before reading it) is not failed:
    it goes back to the queue and the restarted worker serves it."""
    restarts = server.metrics()["ditserve_worker_restarts_total"]
    worker = server.worker()

    async def scenario():
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=120) as client:
            worker.suspend()  # SIGSTOP: the batch goes into its pipe, unread
            task = asyncio.create_task(post(client, {**GOOD, "seed": 6}))
            await asyncio.to_thread(server.wait_metric, "ditserve_running_requests", lambda v: v == 1)
            worker.kill()
            return await task

    response = asyncio.run(scenario())
    assert response.status_code == 200, response.text
    assert server.metrics()["ditserve_worker_restarts_total"] == restarts + 1
    assert "back in the queue" in server.log_text()
    server.wait_ready()
