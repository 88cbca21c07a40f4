"""The worker: a child process that loads the engine once and runs the batches the server sends.

The server process never loads weights. It talks to one worker child (multiprocessing spawn)
through two one-way pipes: batches go down, progress and results come up. Cancellation is a
shared array of request ids that the child checks between denoising steps, so stopping a request
needs no message round trip. When the child dies its pipe closes, the batch in flight fails with
`WorkerDied` (or `NotStarted` when the child never acknowledged it, so the scheduler can queue it
again), and `WorkerHandle` starts a fresh child.

Uploaded input images travel to the child as their compressed bytes and are decoded there, so the
server process never holds their pixels while they wait.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import multiprocessing as mp
import os
import signal
import threading
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection

from ditserve.api import Cancelled, DitserveError, EngineError, GenerationOutput, GenerationRequest, InvalidRequest
from ditserve.config import EngineConfig

log = logging.getLogger(__name__)


# -- messages between the two processes -----------------------------------------------------

@dataclass(frozen=True)
class Batch:
    """Server → worker: resolved, batch-compatible requests; `seqs` are their ids, slot = index."""

    batch_id: int
    seqs: tuple[int, ...]
    requests: tuple[GenerationRequest, ...]


@dataclass(frozen=True)
class EncodedImage:
    """An input image as its uploaded file (PNG, JPEG or WebP), decoded to RGB in the worker (RGBA
    for a layered model, which splits the alpha channel too)."""

    data: bytes

    def decode(self, alpha: bool = False):
        from PIL import Image

        return Image.open(io.BytesIO(self.data)).convert("RGBA" if alpha else "RGB")


@dataclass(frozen=True)
class Started:
    """Worker → server: the batch arrived and is being run (before it, a death loses no work)."""

    batch_id: int


@dataclass(frozen=True)
class Ready:
    pid: int
    device: str


@dataclass(frozen=True)
class Progress:
    batch_id: int
    step: int
    total: int


@dataclass(frozen=True)
class Done:
    batch_id: int
    outputs: list[GenerationOutput]
    memory: dict[str, int] = field(default_factory=dict)  # GPU bytes; empty on CPU


@dataclass(frozen=True)
class Failed:
    batch_id: int | None  # None: the engine could not load
    kind: str  # "invalid" | "cancelled" | "engine"
    message: str
    param: str | None = None
    fatal: bool = False  # the worker exits after sending this (e.g. a broken CUDA context)


class WorkerDied(EngineError):
    """The worker process exited while it held this request."""


class NotStarted(WorkerDied):
    """The worker process exited before it took the batch: no work was done, so it may run again."""


# -- the child process ------------------------------------------------------------------------

def worker_main(tasks: Connection, results: Connection, cancel, config: EngineConfig,
                threads: int | None, log_level: str) -> None:
    """Entry point of the worker process: load, report ready, run batches until told to stop."""
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s worker %(name)s: %(message)s")
    # The server process owns shutdown: a Ctrl-C or a service manager's SIGTERM sent to the whole
    # process group must not kill a batch the server is draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch

    from ditserve.runtime.engine import Engine

    if threads:
        torch.set_num_threads(threads)
    try:
        engine = Engine.from_config(config)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported, then the child exits
        results.send(_failure(None, exc))
        return
    results.send(Ready(os.getpid(), str(engine.pipeline.device)))
    while True:
        try:
            batch = tasks.recv()
        except EOFError:  # the server is gone
            return
        if batch is None:
            return
        results.send(Started(batch.batch_id))
        message = _run(engine, batch, cancel, results)
        results.send(message)
        if isinstance(message, Failed) and message.fatal:
            return


def _run(engine, batch: Batch, cancel, results: Connection) -> Done | Failed:
    from ditserve.pipelines.base import RunControl

    def should_stop() -> bool:  # every request of the batch cancelled: nobody wants the result
        return all(cancel[slot] == seq for slot, seq in enumerate(batch.seqs))

    def on_step(step: int, total: int) -> None:
        results.send(Progress(batch.batch_id, step, total))

    try:
        requests = [_unpacked(r) for r in batch.requests]
        outputs = engine.run_batch(requests, RunControl(should_stop=should_stop, on_step=on_step))
    except Exception as exc:  # noqa: BLE001 - reported to the server; the worker keeps serving
        return _failure(batch.batch_id, exc)
    return Done(batch.batch_id, outputs, _gpu_memory(engine.pipeline.device))


def _packed(request: GenerationRequest) -> GenerationRequest:
    """`request` with its lazily opened uploads (header read, pixels not decoded) as their bytes:
    pickling a PIL image would decode it here, in the server's event loop, and send raw pixels."""
    from PIL import ImageFile

    def pack(image):
        fp = getattr(image, "fp", None)
        if isinstance(image, ImageFile.ImageFile) and isinstance(fp, io.BytesIO):
            return EncodedImage(fp.getvalue())
        return image

    return replace(request, images=tuple(pack(im) for im in request.images)) if request.images else request


def _unpacked(request: GenerationRequest) -> GenerationRequest:
    if not any(isinstance(im, EncodedImage) for im in request.images):
        return request
    return replace(request, images=tuple(im.decode(alpha=bool(request.layers)) if isinstance(im, EncodedImage)
                                         else im for im in request.images))


def _failure(batch_id: int | None, exc: Exception) -> Failed:

    if isinstance(exc, Cancelled):
        return Failed(batch_id, "cancelled", str(exc))
    if isinstance(exc, InvalidRequest):
        return Failed(batch_id, "invalid", exc.message, exc.param)
    if isinstance(exc, DitserveError):
        return Failed(batch_id, "engine", str(exc))
    log.exception("batch %s failed", batch_id)
    # After a CUDA error the context is unusable; a fresh process is the only way back.
    fatal = "CUDA error" in str(exc) or type(exc).__name__ == "AcceleratorError"
    return Failed(batch_id, "engine", f"{type(exc).__name__}: {exc}", fatal=fatal)


def _gpu_memory(device) -> dict[str, int]:
    import torch

    if device.type != "cuda":
        return {}
    return {"allocated": torch.cuda.memory_allocated(device), "reserved": torch.cuda.memory_reserved(device),
            "peak": torch.cuda.max_memory_allocated(device)}


# -- the server's side --------------------------------------------------------------------------

class WorkerHandle:
    """Starts the worker process, runs one batch at a time on it, and restarts it when it dies.

    States: starting → ready → (restarting → ready)* → stopping → stopped.
    """

    def __init__(self, config: EngineConfig, *, slots: int, threads: int | None = None,
                 log_level: str = "INFO"):
        self.config, self.threads, self.log_level = config, threads, log_level
        self.state = "stopped"
        self.restarts = 0
        self.pid: int | None = None
        self.memory: dict[str, int] = {}
        self.on_progress = lambda step, total: None
        self._ctx = mp.get_context("spawn")
        self._cancel = self._ctx.Array("q", max(slots, 1), lock=False)  # slot -> cancelled seq
        self._batch_ids = itertools.count(1)
        self._ready = asyncio.Event()
        self._proc = None
        self._tasks: Connection | None = None
        self._started: asyncio.Future | None = None
        self._running: _InFlight | None = None
        self._restarter: asyncio.Task | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        """Start the worker and wait until its model is loaded; raises what the load raised."""
        self._loop = asyncio.get_running_loop()
        self.state = "starting"
        await self._spawn()

    async def wait_ready(self) -> None:
        await self._ready.wait()

    async def run(self, seqs: list[int], requests: list[GenerationRequest]) -> list[GenerationOutput]:
        """Run one batch; raises Cancelled, InvalidRequest, EngineError, WorkerDied, or NotStarted when
        the worker died before it took the batch."""
    
        if not self.ready:
            raise NotStarted("the worker process is not running")
        batch_id = next(self._batch_ids)
        future = self._loop.create_future()
        self._running = _InFlight(batch_id, future)
        try:
            self._tasks.send(Batch(batch_id, tuple(seqs), tuple(_packed(r) for r in requests)))
        except OSError:
            # The child is gone (it died moments ago); the reader thread reports its exit, and
            # `future` fails with NotStarted because the child never acknowledged the batch.
            log.warning("batch %d could not be sent: the worker process is gone", batch_id)
        try:
            message = await future
        finally:
            self._running = None
        if isinstance(message, Done):
            return message.outputs
        if message.kind == "cancelled":
            raise Cancelled(message.message)
        if message.kind == "invalid":
            raise InvalidRequest(message.message, message.param)
        raise EngineError(message.message)

    def cancel(self, slot: int, seq: int) -> None:
        """Mark the request `seq` in `slot` of the running batch as unwanted (read between steps)."""
        self._cancel[slot] = seq

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the worker to exit after its current batch; kill it after `timeout` seconds."""
        self.state = "stopping"
        if self._restarter is not None:
            self._restarter.cancel()
        proc = self._proc
        if proc is None:
            self.state = "stopped"
            return
        try:
            self._tasks.send(None)
        except OSError:
            pass
        await asyncio.to_thread(proc.join, timeout)
        if proc.is_alive():
            log.warning("worker %d did not exit within %.0f s; killing it", proc.pid, timeout)
            proc.kill()
            await asyncio.to_thread(proc.join, 5)
        self.state = "stopped"

    # -- process management ------------------------------------------------------------------

    async def _spawn(self) -> None:
        tasks_recv, tasks_send = self._ctx.Pipe(duplex=False)
        results_recv, results_send = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=worker_main, name="ditserve-worker", daemon=True,
            args=(tasks_recv, results_send, self._cancel, self.config, self.threads, self.log_level))
        proc.start()
        # Close our copies of the child's ends, so the child's exit reads as EOF here.
        tasks_recv.close()
        results_send.close()
        self._proc, self._tasks = proc, tasks_send
        self._started = self._loop.create_future()
        threading.Thread(target=self._read, args=(proc, results_recv), daemon=True,
                         name="ditserve-worker-reader").start()
        log.info("started worker process %d", proc.pid)
        await self._started

    def _read(self, proc, conn: Connection) -> None:
        """Reader thread: forward every message to the event loop, then report the exit."""
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            self._post(self._on_message, proc, message)
        conn.close()
        proc.join(10)
        if proc.is_alive():  # closed its pipe but did not exit: unusable
            proc.kill()
            proc.join()
        self._post(self._on_exit, proc)

    def _post(self, callback, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _on_message(self, proc, message) -> None:
        if proc is not self._proc:
            return
        if isinstance(message, Ready):
            self.state, self.pid = "ready", message.pid
            self._ready.set()
            _resolve(self._started, None)
            log.info("worker %d ready on %s", message.pid, message.device)
        elif message.batch_id is None:  # Failed to load
            error = InvalidRequest(message.message, message.param) if message.kind == "invalid" \
                else EngineError(message.message)
            _resolve(self._started, error=error)
        elif self._running is not None and self._running.batch_id == message.batch_id:
            self._running.started = True
            if isinstance(message, Progress):
                self.on_progress(message.step, message.total)
            elif not isinstance(message, Started):
                if isinstance(message, Done):
                    self.memory = message.memory
                _resolve(self._running.future, message)

    def _on_exit(self, proc) -> None:
        if proc is not self._proc:
            return
        self._ready.clear()
        self.pid = None
        reason = _exit_reason(proc.exitcode)
        died = WorkerDied(f"the worker process {reason}; it is being restarted")
        _resolve(self._started, error=died)
        if self._running is not None:
            error = died if self._running.started else NotStarted(f"the worker process {reason} before it "
                                                                   "took the batch")
            _resolve(self._running.future, error=error)
        if self.state in ("stopping", "stopped"):
            self.state = "stopped"
            return
        log.error("worker process %d %s", proc.pid, _exit_reason(proc.exitcode))
        if self.state == "ready":
            self.state = "restarting"
            self._restarter = self._loop.create_task(self._restart())

    async def _restart(self) -> None:
        delay = 0.0
        while self.state == "restarting":
            self.restarts += 1
            try:
                await self._spawn()
                return
            except DitserveError as exc:
                delay = min(30.0, max(0.5, delay * 2))
                log.error("worker restart failed (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)


@dataclass
class _InFlight:
    """The batch the worker holds; `started` once the worker acknowledged it."""

    batch_id: int
    future: asyncio.Future
    started: bool = False


def _resolve(future: asyncio.Future | None, result=None, error: BaseException | None = None) -> None:
    if future is None or future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
