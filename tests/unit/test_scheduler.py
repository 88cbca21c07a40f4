"""runtime.Scheduler without a server: a real worker process on the tiny FLUX checkpoint, driven
from asyncio as the HTTP handlers drive it."""

import asyncio

import pytest

from ditserve.api import Cancelled, GenerationRequest, Overloaded
from ditserve.config import EngineConfig, ModelConfig
from ditserve.runtime.loader import inspect_model
from ditserve.runtime.scheduler import Scheduler
from ditserve.runtime.worker import WorkerHandle


def request(model, steps=2, size=32, seed=0, num_images=1) -> GenerationRequest:
    source = inspect_model(model)
    req = GenerationRequest("a fox", height=size, width=size, num_inference_steps=steps, seed=seed,
                            max_sequence_length=16, num_images=num_images)
    return req.resolve(source.defaults, source.limits)


# (name, scheduler settings); each body runs on a fresh Scheduler, in this order, over ONE worker process
# (a worker start costs ~5 s of imports and loading on 2 CPU cores)
SCENARIOS = [("share", dict(max_queue=8, max_batch_size=2)), ("full", dict(max_queue=2, max_batch_size=1))]


async def _batches(sched, model):
    a, b, c = (sched.submit(request(model, seed=s)) for s in (1, 2, 3))
    other = sched.submit(request(model, size=48))  # another size: another batch key
    outs = await asyncio.gather(*(t.future for t in (a, b, c, other)))
    return [t.batch_images for t in (a, b, c, other)], outs, sched.steps_total


async def _full_queue(sched, model):
    running = sched.submit(request(model, steps=40))
    while sched.running == 0:
        await asyncio.sleep(0.01)
    waiting = [sched.submit(request(model, steps=40, size=48)) for _ in range(2)]
    with pytest.raises(Overloaded, match="queue is full"):
        sched.submit(request(model))
    sched.cancel(waiting[0])
    assert sched.queue_length == 1
    sched.cancel(running)  # stops in the worker at the next step
    sched.cancel(waiting[1])
    await sched.wait_idle()
    return running, waiting, sched.runs_stopped_total


@pytest.fixture(scope="module")
def scenarios(tiny_flux_schnell):
    """Each scenario's result, or the exception it raised (re-raised by its test)."""
    model = tiny_flux_schnell
    bodies = {"share": _batches, "full": _full_queue}

    async def main():
        worker = WorkerHandle(EngineConfig(ModelConfig(str(model), "cpu", "float32"), max_batch_size=2),
                              slots=2, threads=1)
        await worker.start()
        results = {}
        try:
            for name, settings in SCENARIOS:
                sched = Scheduler(worker, inspect_model(model).pipeline_cls.batch_key, **settings)
                loop = asyncio.create_task(sched.run())
                try:
                    results[name] = ("ok", await bodies[name](sched, model))
                except Exception as exc:  # noqa: BLE001 - the scenario's own test reports it
                    results[name] = ("error", exc)
                finally:
                    loop.cancel()
        finally:
            await worker.stop()
        return results

    return asyncio.run(main())


def outcome(scenarios, name):
    kind, value = scenarios[name]
    if kind == "error":
        raise value
    return value


def test_compatible_requests_share_a_batch_and_others_wait(scenarios):
    sizes, outs, steps = outcome(scenarios, "share")
    # the worker is busy with the first request while the rest queue up: a batch never mixes keys
    # and never exceeds max_batch_size images
    assert all(n <= 2 for n in sizes) and sizes[3] == 1
    assert [o.seed for o in outs] == [1, 2, 3, 0] and outs[3].images[0].size == (48, 48)
    assert steps == 2 * len({id(o.timings) for o in outs})  # one progress report per step per batch


def test_full_queue_refuses_and_cancelled_request_leaves_it(scenarios):
    running, waiting, stopped = outcome(scenarios, "full")
    assert all(t.future.cancelled() for t in (running, *waiting))
    assert stopped == 1 and running.step < 40  # stopped at a stage boundary or a step, long before the end


def test_cancelled_error_is_the_api_type():
    assert issubclass(Cancelled, Exception) and Cancelled.__module__ == "ditserve.api.errors"
