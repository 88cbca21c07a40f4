"""runtime.Scheduler's queue logic against a scripted worker (no process, no model, no server):
batching by key and image count, the bounded queue, cancellation in the queue and in the running
batch, a batch the worker never took going back to the head of the queue, draining, errors.
tests/unit/test_scheduler.py drives the same class with a real worker process."""

import asyncio

import pytest

from ditserve.api import Cancelled, EngineError, GenerationOutput, GenerationRequest, Overloaded, Timings
from ditserve.runtime.scheduler import MAX_ATTEMPTS, Scheduler, Unavailable
from ditserve.runtime.worker import NotStarted


class ScriptedWorker:
    """The WorkerHandle surface the scheduler uses. Each batch waits until the test releases it (or a
    cancellation of every request in it arrives) and then answers with `outcome(batch)`."""

    def __init__(self):
        self.on_progress = lambda step, total: None
        self.batches: list[list[int]] = []
        self.cancels: list[tuple[int, int]] = []
        self.outcomes: list = []  # per batch: None (outputs), or an exception to raise
        self.release = asyncio.Event()
        self.release.set()

    async def wait_ready(self):
        return None

    async def run(self, seqs, requests):
        self.batches.append(list(seqs))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        self.on_progress(1, 2)
        while not self.release.is_set():
            if {s for _, s in self.cancels} >= set(seqs):
                raise Cancelled("stopped between steps")
            await asyncio.sleep(0)
        if outcome is not None:
            raise outcome
        return [GenerationOutput(images=[], timings=Timings(), seed=r.seed) for r in requests]

    def cancel(self, slot, seq):
        self.cancels.append((slot, seq))


def req(seed=0, size=32, n=1) -> GenerationRequest:
    return GenerationRequest("a fox", height=size, width=size, seed=seed, num_images=n)


def key(r: GenerationRequest):
    return (r.height, r.width)


def run(body, max_queue=8, max_batch_size=2, worker=None):
    async def main():
        w = worker or ScriptedWorker()
        sched = Scheduler(w, key, max_queue=max_queue, max_batch_size=max_batch_size)
        loop = asyncio.create_task(sched.run())
        try:
            return await asyncio.wait_for(body(sched, w), timeout=5)
        finally:
            loop.cancel()
    return asyncio.run(main())


def test_batches_share_a_key_and_respect_the_image_budget():
    async def body(sched, w):
        tickets = [sched.submit(r) for r in (req(1), req(2, size=48), req(3), req(4, n=2), req(5))]
        await asyncio.gather(*(t.future for t in tickets))
        return w.batches, [t.batch_images for t in tickets]

    batches, images = run(body)
    # oldest first; a batch takes later requests of the head's key while they fit 2 images
    assert batches == [[1, 3], [2], [4], [5]]
    assert images == [2, 1, 2, 2, 1]


def test_full_queue_and_draining_refuse_with_retry_after():
    async def body(sched, w):
        w.release.clear()
        sched.submit(req(1))
        while not w.batches:
            await asyncio.sleep(0)
        queued = [sched.submit(req(s)) for s in (2, 3)]
        with pytest.raises(Overloaded, match="queue is full") as full:
            sched.submit(req(4))
        sched.close()
        with pytest.raises(Unavailable):
            sched.submit(req(5))
        w.release.set()
        await asyncio.gather(*(t.future for t in queued))  # draining: queued work still finishes
        return full.value.retry_after

    assert run(body, max_queue=2, max_batch_size=1) >= 1.0


def test_cancel_leaves_the_queue_and_stops_the_running_batch():
    async def body(sched, w):
        w.release.clear()
        running = sched.submit(req(1))
        while not w.batches:
            await asyncio.sleep(0)
        waiting = sched.submit(req(2))
        sched.cancel(waiting)
        assert sched.queue_length == 0 and waiting.future.cancelled() and not w.cancels
        sched.cancel(running)  # in the worker: slot 0, seq 1, read between steps
        await sched.wait_idle()
        return running, w, sched

    running, w, sched = run(body, max_batch_size=1)
    assert w.cancels == [(0, 1)] and running.future.cancelled() and w.batches == [[1]]
    assert sched.runs_stopped_total == 1 and sched.cancelled_total == 2 and sched.steps_total == 1


def test_a_batch_the_worker_never_took_goes_back_to_the_head_then_fails():
    async def body(sched, w):
        w.outcomes = [NotStarted("worker died before it took the batch")] * MAX_ATTEMPTS
        first, second = sched.submit(req(1)), sched.submit(req(2, size=48))
        with pytest.raises(NotStarted):
            await first.future
        await second.future  # the next batch runs once the first gave up
        return w.batches, first.attempts

    batches, attempts = run(body, max_batch_size=1)
    assert batches[:MAX_ATTEMPTS] == [[1]] * MAX_ATTEMPTS and attempts == MAX_ATTEMPTS
    assert batches[MAX_ATTEMPTS:] == [[2]]


def test_an_engine_error_fails_every_request_of_its_batch_only():
    async def body(sched, w):
        w.outcomes = [EngineError("out of GPU memory")]
        a, b, c = sched.submit(req(1)), sched.submit(req(2)), sched.submit(req(3, size=48))
        results = await asyncio.gather(a.future, b.future, c.future, return_exceptions=True)
        return results

    a, b, c = run(body)
    assert isinstance(a, EngineError) and isinstance(b, EngineError) and c.seed == 3
