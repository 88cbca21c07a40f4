"""The executor under the engine when a request is split across GPUs: it starts one process per rank
(runtime/ranks.py), hands batches to rank 0, relays cancellation and progress, and returns outputs.

    engine = Engine.from_config(EngineConfig(model, parallel=ParallelConfig(num_gpus=4, ulysses_degree=4)))
    engine.generate(request)          # a ParallelEngine: same interface as the one-process Engine

Life of a group: the executor opens an authenticated socket and a rendezvous store, both on ports
the OS picks (no race with other programs), and starts the ranks with their spec on stdin. Rank 0
connects, receives the engine config and broadcasts it; every rank loads its share; rank 0 says
ready. A rank that exits (crash, kill, OOM) fails the batch in flight with `RankDied`; the executor
kills the rest of the group and starts a fresh one in the background (`ready` is False meanwhile).
`shutdown` (also at interpreter exit) stops every rank; ranks also exit by themselves when the
executor's process is gone.

Across machines (`nnodes` > 1) the ranks run under torchrun on every machine and the executor only
waits for rank 0 at master_port + 1 (see `torchrun_command`); restarting them is torchrun's job
(`--max-restarts`), after which the new rank 0 connects again.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import pickle
import queue
import secrets
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, Listener
from pathlib import Path

import torch

from ditserve.api import Cancelled, EngineError, GenerationOutput, GenerationRequest, InvalidRequest
from ditserve.config import EngineConfig, parse_device
from ditserve.pipelines.base import RunControl
from ditserve.runtime.engine import Engine
from ditserve.runtime.loader import ModelSource, inspect_model
from ditserve.runtime.handoff import collect_videos
from ditserve.runtime.ranks import (STORE_TIMEOUT, Batch, Cancel, Done, Failed, Hello, Progress, RankSpec, Ready,
                                    Setup, read_auth_key)

log = logging.getLogger(__name__)

POLL_S = 0.05  # how often a waiting executor checks for cancellation and dead ranks
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class RankDied(EngineError):
    """A rank of the group exited (or failed in a way the ranks may not share) while it held this
    batch; the group is being restarted."""


class Executor:
    """One replica's group of ranks. States: stopped → starting → ready → (restarting → ready)* →
    stopping → stopped. `run` serves one batch at a time."""

    def __init__(self, config: EngineConfig, *, replica: int = 0, threads: int | None = None,
                 log_level: str | None = None, start_timeout: float = 600.0):
        """`threads`: torch CPU threads per rank (None: torch's default, this process's count when it
        set one); `log_level`: the ranks' (None: this process's)."""
        self.config, self.replica = config, replica
        if threads is None and torch.get_num_threads() < (os.cpu_count() or 1):
            threads = torch.get_num_threads()
        log_level = log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())
        self.threads, self.log_level, self.start_timeout = threads, log_level, start_timeout
        self.parallel = config.parallel
        self.world = self.parallel.group_size
        self.attach = self.parallel.nnodes > 1  # ranks under torchrun: wait for rank 0, start nothing
        self.state = "stopped"
        self.restarts = 0
        self.batches = 0  # batches run (replicas: how the work spread)
        self.procs: list[subprocess.Popen] = []
        self._conn: Connection | None = None
        self._listener: Listener | None = None
        self._store = None
        self._ids = itertools.count(1)
        self._ready = threading.Event()
        self._lock = threading.RLock()  # state and processes
        self._run_lock = threading.Lock()  # one batch at a time

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the ranks and wait until every one has loaded; raises what the load raised."""
        with self._lock:
            self.state = "starting"
        try:
            self._launch()
        except BaseException:
            self._teardown()
            with self._lock:
                self.state = "stopped"
            raise

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every rank (after its current step at the latest: a stop cancels the batch)."""
        with self._lock:
            if self.state == "stopped":
                return
            self.state = "stopping"
            self._ready.clear()
            conn = self._conn
        if conn is not None:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("rank process %d did not stop within %.0f s; killing it", proc.pid, timeout)
        self._teardown()
        with self._lock:
            self.state = "stopped"

    def _launch(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        listener, authkey = self._open()
        if not self.attach:
            self._spawn(listener.address, authkey)
        conn = self._accept(listener, deadline)
        hello = self._recv(conn, deadline)
        if not isinstance(hello, Hello):
            raise EngineError(f"rank 0 sent {type(hello).__name__} instead of its greeting")
        conn.send(Setup(self.config))
        reply = self._recv(conn, deadline)
        if isinstance(reply, Failed):
            error = InvalidRequest(reply.message, reply.param) if reply.kind == "invalid" else EngineError(reply.message)
            raise error
        if not isinstance(reply, Ready):
            raise EngineError(f"rank 0 sent {type(reply).__name__} instead of ready")
        with self._lock:
            if self.state not in ("starting", "restarting"):  # shut down while starting
                conn.close()
                self._teardown()
                return
            self._conn, self.state = conn, "ready"
            self._ready.set()
        log.info("parallel group %d ready: %d ranks on %s (pids %s)", self.replica, reply.world, reply.device,
                 self.pids or "under torchrun")

    def _open(self) -> tuple[Listener, bytes]:
        """The socket rank 0 connects to: a fresh OS-chosen port and key per local group; the
        configured port and shared key across machines (kept across restarts)."""
        if self.attach:
            if self._listener is None:
                authkey = read_auth_key(self.parallel.auth_key_file)
                address = ("0.0.0.0", self.parallel.master_port + 1)
                self._listener = Listener(address, authkey=authkey)
                self._authkey = authkey
                log.info("waiting for rank 0 (torchrun) on port %d", address[1])
            return self._listener, self._authkey
        authkey = secrets.token_bytes(32)
        self._listener = Listener(("127.0.0.1", 0), authkey=authkey)
        return self._listener, authkey

    def _spawn(self, address, authkey: bytes) -> None:
        from torch.distributed import TCPStore

        self._store = TCPStore("127.0.0.1", 0, self.world, True, STORE_TIMEOUT, wait_for_workers=False)
        code = f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); from ditserve.runtime.ranks import main; main()"
        for rank in range(self.world):
            spec = RankSpec(rank, self.world, ("127.0.0.1", self._store.port), address, authkey, self._device(rank),
                            os.getpid(), self.threads, self.log_level)
            # own session: a Ctrl-C at the terminal reaches the executor, which stops the ranks in order
            proc = subprocess.Popen([sys.executable, "-c", code, "--spec-stdin"], stdin=subprocess.PIPE,
                                    start_new_session=True)
            proc.stdin.write(pickle.dumps(spec))
            proc.stdin.close()
            self.procs.append(proc)
        log.info("started %d rank processes: %s", self.world, self.pids)

    def _device(self, rank: int) -> str:
        """Rank r of replica k on GPU k * world + r; CPU processes where there is no GPU."""
        if not parse_device(self.config.model.device).startswith("cuda"):
            return "cpu"
        return f"cuda:{self.replica * self.world + rank}"

    def _teardown(self) -> None:
        """Kill whatever is left of the group and close its sockets."""
        with self._lock:
            procs, self.procs = self.procs, []
            conn, self._conn = self._conn, None
            store, self._store = self._store, None
            if not self.attach and self._listener is not None:
                self._listener.close()
                self._listener = None
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        if conn is not None:
            conn.close()
        del store

    def _restart(self, reason: str) -> None:
        """Kill the group and start a fresh one in the background."""
        with self._lock:
            if self.state in ("stopping", "stopped"):
                return
            self.state = "restarting"
            self._ready.clear()
        log.error("parallel group %d failed (%s); restarting it", self.replica, reason)
        self._teardown()
        threading.Thread(target=self._restart_loop, daemon=True, name="ditserve-group-restart").start()

    def _restart_loop(self) -> None:
        delay = 0.5
        while self.state == "restarting":
            self.restarts += 1
            try:
                self._launch()
                return
            except Exception as exc:  # noqa: BLE001 - retried with backoff until shut down
                self._teardown()
                log.error("group restart failed (%s); retrying in %.1f s", exc, delay)
                time.sleep(delay)
                delay = min(30.0, delay * 2)

    # -- batches -------------------------------------------------------------------------------

    def run(self, requests: list[GenerationRequest], control: RunControl) -> list[GenerationOutput]:
        """Run one batch on the group; raises Cancelled, InvalidRequest, EngineError or RankDied."""
        if self.state in ("stopping", "stopped"):
            raise EngineError("the parallel group is not running")
        if not self._ready.wait(self.start_timeout):
            raise EngineError("the parallel group did not become ready")
        with self._run_lock:
            self.batches += 1
            try:
                return self._drive(next(self._ids), requests, control)
            except RankDied as exc:
                self._restart(str(exc))
                raise

    def _drive(self, batch_id: int, requests, control: RunControl) -> list[GenerationOutput]:
        conn = self._conn
        try:
            conn.send(Batch(batch_id, tuple(requests)))
        except (OSError, AttributeError):
            raise RankDied("rank 0 is gone") from None
        cancel_sent = False
        while True:
            message = self._poll(conn)
            if not cancel_sent and control.should_stop():
                conn.send(Cancel(batch_id))
                cancel_sent = True
            if message is None:
                continue
            if isinstance(message, Progress):
                control.on_step(message.step, message.total)
            elif isinstance(message, Done):
                return collect_videos(message.outputs)
            elif isinstance(message, Failed):
                if message.fatal:
                    # a peer's death shows on rank 0 as a broken collective: name the dead rank if there is one
                    self._check_alive(wait=2.0)
                    raise RankDied(f"a rank failed: {message.message}")
                if message.kind == "cancelled":
                    raise Cancelled(message.message)
                if message.kind == "invalid":
                    raise InvalidRequest(message.message, message.param)
                raise EngineError(message.message)

    def _poll(self, conn: Connection):
        """The next message from rank 0 within POLL_S, or None; RankDied when a rank is gone."""
        try:
            if conn.poll(POLL_S):
                return conn.recv()
        except (EOFError, OSError):
            self._check_alive(wait=1.0)
            raise RankDied("rank 0 closed its connection") from None
        self._check_alive()
        return None

    def _check_alive(self, wait: float = 0.0) -> None:
        deadline = time.monotonic() + wait
        while True:
            # every dead rank, the one a signal killed first: a peer's death makes the others exit too
            dead = [(rank, proc, code) for rank, proc in enumerate(self.procs) if (code := proc.poll()) is not None]
            if dead:
                dead.sort(key=lambda d: d[2] >= 0)
                raise RankDied("; ".join(f"rank {rank} (pid {proc.pid}) {_exit_reason(code)}" for rank, proc, code in dead))
            if time.monotonic() >= deadline:
                return
            time.sleep(POLL_S)

    def _recv(self, conn: Connection, deadline: float):
        while time.monotonic() < deadline:
            message = self._poll(conn)
            if message is not None:
                return message
        raise EngineError(f"the parallel group did not answer within {self.start_timeout:.0f} s")

    def _accept(self, listener: Listener, deadline: float) -> Connection:
        """Wait for rank 0 to connect, watching the local ranks meanwhile."""
        box: dict = {}

        def accept():
            try:
                box["conn"] = listener.accept()
            except Exception as exc:  # noqa: BLE001 - closed listener, failed handshake
                box["error"] = exc

        thread = threading.Thread(target=accept, daemon=True, name="ditserve-accept")
        thread.start()
        while thread.is_alive():
            thread.join(POLL_S)
            self._check_alive()
            if time.monotonic() > deadline:
                raise EngineError(f"rank 0 did not connect within {self.start_timeout:.0f} s")
        if "error" in box:
            raise EngineError(f"rank 0 could not connect: {box['error']}")
        return box["conn"]


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"was killed by signal {-code}"
    return f"exited with code {code}"


class _GroupDevice:
    """What a ParallelEngine reports as its device (it holds no model itself)."""

    type = "group"

    def __init__(self, text: str):
        self.text = text

    def __str__(self) -> str:
        return self.text


class _GroupPipeline:
    """The pipeline attributes callers of an Engine read, without a model in this process."""

    def __init__(self, source: ModelSource, device: _GroupDevice):
        self.batch_key, self.device, self.dit_names = source.pipeline_cls.batch_key, device, ()


class ParallelEngine(Engine):
    """The Engine interface over `num_replicas` executors; a batch runs on whichever is free."""

    def __init__(self, executors: list[Executor], source: ModelSource, config: EngineConfig):
        p = config.parallel
        modes = [f"{name} {n}" for name, n in (("cfg", p.cfg_degree), ("ulysses", p.ulysses_degree),
                                                 ("ring", p.ring_degree), ("tp", p.tp_size)) if n > 1]
        text = f"{config.model.device or 'auto'} x{p.group_size} ({', '.join(modes) or 'replicated'})"
        if p.num_replicas > 1:
            text += f" x{p.num_replicas} replicas"
        super().__init__(_GroupPipeline(source, _GroupDevice(text)), source)
        self.config, self.executors = config, executors
        self._idle: queue.Queue[Executor] = queue.Queue()
        for executor in executors:
            self._idle.put(executor)

    @classmethod
    def start(cls, cfg: EngineConfig, source: ModelSource | None = None, **executor_options) -> "ParallelEngine":
        """Start every replica's ranks (concurrently) and wait for all to load."""
        source = source or inspect_model(cfg.model.path)
        executors = [Executor(cfg, replica=k, **executor_options) for k in range(cfg.parallel.num_replicas)]
        errors: list[BaseException] = []

        def start(executor: Executor) -> None:
            try:
                executor.start()
            except BaseException as exc:  # noqa: BLE001 - re-raised below after stopping the others
                errors.append(exc)

        threads = [threading.Thread(target=start, args=(e,)) for e in executors]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            for executor in executors:
                executor.shutdown()
            raise errors[0]
        engine = cls(executors, source, cfg)
        atexit.register(engine.close)
        return engine

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.executors)

    def run_batch(self, requests: list[GenerationRequest], control: RunControl | None = None) -> list[GenerationOutput]:
        keys = {self.source.pipeline_cls.batch_key(r) for r in requests}
        if len(keys) != 1:
            raise InvalidRequest("requests in one batch must share size, steps and guidance mode")
        executor = self._idle.get()
        try:
            return executor.run(requests, control or RunControl())
        finally:
            self._idle.put(executor)

    def close(self) -> None:
        """Stop every rank of every replica."""
        for executor in self.executors:
            executor.shutdown()
