"""The server-side scheduler: a bounded queue, batching of compatible requests, cancellation.

Requests wait in arrival order. When the worker is free, the oldest request leaves the queue
together with the queued requests that share its batch key, up to `max_batch_size` images.
A cancelled request leaves the queue at once; in the running batch it is marked for the worker,
which stops between denoising steps once every request of its batch is cancelled. A batch the
worker never took (it died just before) goes back to the head of the queue for the next worker.

Tickets know nothing of HTTP: a request handler awaits one and cancels it when its client goes
away; an asynchronous job (video) can hold one and poll its progress instead.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ditserve.api import Cancelled, DitserveError, GenerationOutput, GenerationRequest, Overloaded
from ditserve.runtime.worker import NotStarted, WorkerHandle

log = logging.getLogger(__name__)


# Times a request is offered to a fresh worker after the previous one died before taking it.
MAX_ATTEMPTS = 3


class Unavailable(Overloaded):
    """Not taking new requests (draining for shutdown); the HTTP edge answers 503."""


@dataclass(eq=False)
class Ticket:
    """One request on its way through the scheduler."""

    seq: int
    request: GenerationRequest
    key: Hashable
    future: asyncio.Future
    enqueued_at: float
    started_at: float | None = None
    batch_images: int = 0  # images in the pipeline call that ran it
    step: int = 0
    total_steps: int = 0
    cancelled: bool = False
    attempts: int = 0  # batches it was sent in that the worker never took

    @property
    def queue_s(self) -> float:
        return (self.started_at or time.monotonic()) - self.enqueued_at


class Scheduler:
    """Feeds the worker one batch at a time from a bounded queue."""

    def __init__(self, worker: WorkerHandle, batch_key: Callable[[GenerationRequest], Hashable], *,
                 max_queue: int, max_batch_size: int):
        self.worker = worker
        self.batch_key = batch_key
        self.max_queue, self.max_batch_size = max_queue, max_batch_size
        self.accepting = True
        self.steps_total = 0  # denoising steps run (one per step of a batch)
        self.cancelled_total = 0  # requests cancelled before they finished
        self.runs_stopped_total = 0  # batches the worker stopped early because all were cancelled
        self._queue: list[Ticket] = []
        self._running: list[Ticket] = []
        self._seqs = itertools.count(1)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._batch_s = 1.0  # moving average of a batch's wall time, for Retry-After
        worker.on_progress = self._on_progress

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    def check_room(self) -> None:
        """Raise Overloaded when the queue is full, Unavailable when draining: callers check before
        they spend work on a request (decoding its uploads), and `submit` checks again."""
        if not self.accepting:
            raise Unavailable("the server is shutting down and takes no new requests",
                              retry_after=self.retry_after())
        if len(self._queue) >= self.max_queue:
            raise Overloaded(f"the queue is full ({len(self._queue)} requests waiting); retry later",
                             retry_after=self.retry_after())

    def submit(self, request: GenerationRequest) -> Ticket:
        """Queue a resolved request; raises Overloaded when the queue is full, Unavailable when draining."""
        self.check_room()
        ticket = Ticket(next(self._seqs), request, self.batch_key(request),
                        asyncio.get_running_loop().create_future(), time.monotonic())
        self._queue.append(ticket)
        self._changed()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """The caller no longer wants `ticket`: drop it from the queue or stop it between steps."""
        if ticket.cancelled or ticket.future.done():
            return
        ticket.cancelled = True
        self.cancelled_total += 1
        ticket.future.cancel()
        if ticket in self._queue:
            self._queue.remove(ticket)
            self._changed()
        elif ticket in self._running:
            self.worker.cancel(self._running.index(ticket), ticket.seq)

    def retry_after(self) -> float:
        """Seconds until the queue has likely moved on by one batch per `max_batch_size` waiting."""
        return max(1.0, self._batch_s * (1 + len(self._queue) // self.max_batch_size))

    def close(self) -> None:
        """Stop taking requests (drain); queued and running ones still finish."""
        self.accepting = False

    async def wait_idle(self) -> None:
        await self._idle.wait()

    async def run(self) -> None:
        """The dispatch loop: whenever the worker is ready and work waits, run the next batch."""
        while True:
            await self.worker.wait_ready()
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue  # readiness may have changed while waiting
            await self._execute(self._take_batch())

    def _take_batch(self) -> list[Ticket]:
        head = self._queue[0]
        batch, images = [], 0
        for ticket in self._queue:
            n = ticket.request.num_images
            if ticket.key == head.key and (not batch or images + n <= self.max_batch_size):
                batch.append(ticket)
                images += n
        self._queue = [t for t in self._queue if t not in batch]
        return batch

    async def _execute(self, batch: list[Ticket]) -> None:
        start = time.monotonic()
        images = sum(t.request.num_images for t in batch)
        for ticket in batch:
            ticket.started_at, ticket.batch_images = start, images
        self._running = batch
        self._changed()
        log.debug("batch of %d requests (%d images)", len(batch), images)
        try:
            outputs = await self.worker.run([t.seq for t in batch], [t.request for t in batch])
        except Cancelled:
            self.runs_stopped_total += 1
        except NotStarted as exc:
            self._requeue(batch, exc)
        except DitserveError as exc:
            for ticket in batch:
                _settle(ticket.future, error=exc)
        else:
            self._batch_s = 0.8 * self._batch_s + 0.2 * (time.monotonic() - start)
            for ticket, output in zip(batch, outputs, strict=True):
                _settle(ticket.future, output)
        finally:
            self._running = []
            self._changed()

    def _requeue(self, batch: list[Ticket], exc: NotStarted) -> None:
        """Put a batch the worker never took back at the head of the queue, in order; a request offered
        to MAX_ATTEMPTS workers that each died before taking it fails with `exc`."""
        waiting = [t for t in batch if not t.future.done()]
        for ticket in waiting:
            ticket.attempts += 1
            ticket.started_at, ticket.batch_images = None, 0
        again = [t for t in waiting if t.attempts < MAX_ATTEMPTS]
        for ticket in waiting:
            if ticket not in again:
                _settle(ticket.future, error=exc)
        self._queue[:0] = again
        log.warning("%s; %d request(s) back in the queue", exc, len(again))

    def _on_progress(self, step: int, total: int) -> None:
        self.steps_total += 1
        for ticket in self._running:
            ticket.step, ticket.total_steps = step, total

    def _changed(self) -> None:
        self._wake.set()
        if self._queue or self._running:
            self._idle.clear()
        else:
            self._idle.set()


def _settle(future: asyncio.Future, result: GenerationOutput | None = None,
            error: BaseException | None = None) -> None:
    if future.done():  # cancelled by its caller
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
