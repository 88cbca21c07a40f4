"""One rank of a parallel replica: join the group, load this rank's share of the model, then run
every batch that rank 0 receives from the executor and broadcasts.

Rank 0 is connected to the executor (runtime/executor.py) by an authenticated socket; the others
follow it through a gloo control group: each batch, and every step whether to go on (a cancel from
the executor reaches all ranks within one step). Only rank 0 reports progress and returns outputs.

A rank exits when the executor says stop or goes away (its socket closes, or, for local ranks, the
parent process changes), and on any failure that the ranks might not share: the executor then
fails the batch and restarts the whole group. Deterministic refusals (invalid requests,
cancellation) are reported and the group keeps serving.

Started two ways, the same code either way:
- locally by the executor: `python -m ditserve.runtime.ranks --spec-stdin` (RankSpec on stdin);
- across machines under torchrun: `torchrun ... -m ditserve.runtime.ranks --driver HOST:PORT
  --auth-key-file FILE` (rank, world size and rendezvous from torchrun's environment).
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Client, Connection

from ditserve.api import Cancelled, GenerationOutput, GenerationRequest, InvalidRequest
from ditserve.config import EngineConfig
from ditserve.runtime.handoff import discard_videos, share_videos

log = logging.getLogger(__name__)

STORE_TIMEOUT = timedelta(minutes=10)  # joining the group (model loads start after it)


# -- messages between the executor and rank 0 ------------------------------------------------

@dataclass(frozen=True)
class Hello:
    """Rank 0 → executor, on connecting: the group's size."""

    world: int
    pid: int


@dataclass(frozen=True)
class Setup:
    """Executor → rank 0: what to load (broadcast to every rank)."""

    config: EngineConfig


@dataclass(frozen=True)
class Ready:
    world: int
    device: str


@dataclass(frozen=True)
class Batch:
    batch_id: int
    requests: tuple[GenerationRequest, ...]


@dataclass(frozen=True)
class Cancel:
    batch_id: int


@dataclass(frozen=True)
class Progress:
    batch_id: int
    step: int
    total: int


@dataclass(frozen=True)
class Done:
    batch_id: int
    outputs: list[GenerationOutput]


@dataclass(frozen=True)
class Failed:
    batch_id: int | None  # None: the group could not start (load, world size)
    kind: str  # "invalid" | "cancelled" | "engine"
    message: str
    param: str | None = None
    fatal: bool = False  # the ranks exit after this; the executor restarts the group


@dataclass(frozen=True)
class RankSpec:
    """How a locally started rank joins its group (sent on its stdin: the key stays out of `ps`)."""

    rank: int
    world: int
    store: tuple[str, int]
    driver: tuple[str, int]
    authkey: bytes
    device: str
    parent: int  # the executor's pid: the rank exits when it is gone
    threads: int | None = None
    log_level: str = "INFO"


# -- the rank's life -----------------------------------------------------------------------------

def run_rank(device: str, driver: tuple[str, int], authkey: bytes, local: bool = False) -> int:
    """Join (torch.distributed already initialised), load, serve until told to stop. Returns the exit code.
    `local`: on the executor's machine (videos then go back through shared memory)."""
    import torch
    import torch.distributed as dist

    from ditserve.parallel.groups import control_group, init_groups
    from ditserve.runtime.engine import Engine

    rank = dist.get_rank()
    control = control_group()
    conn = _connect(driver, authkey) if rank == 0 else None
    if conn is not None:
        conn.send(Hello(dist.get_world_size(), os.getpid()))
    setup = _broadcast(_recv_setup(conn) if conn is not None else None, control)
    if setup is None:
        return 1
    cfg = setup.config
    if cfg.parallel.group_size != dist.get_world_size():
        if conn is not None:
            conn.send(Failed(None, "invalid", f"the group has {dist.get_world_size()} ranks but the parallel "
                                              f"settings need {cfg.parallel.group_size}", "num_gpus"))
        return 1
    groups = init_groups(cfg.parallel, torch.device(device), control)
    try:
        engine, failure = Engine.from_config(cfg, groups=groups), None
    except Exception as exc:  # noqa: BLE001 - reported to the executor, then the group ends
        log.warning("rank %d could not load: %s", rank, exc)
        engine, failure = None, _failure(None, exc)
    # every rank's outcome to rank 0, so it reports the first failure (and nobody exits before that)
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, failure, group=control)
    failure = next((f for f in outcomes if f is not None), None)
    if failure is not None:
        if conn is not None:
            conn.send(failure)
        return 1
    if conn is not None:
        conn.send(Ready(dist.get_world_size(), device))
    log.info("rank %d ready on %s", rank, device)
    try:
        return _serve(engine, groups, conn, local)
    except (OSError, RuntimeError) as exc:  # the executor or a peer went away mid-batch
        log.error("rank %d stops: %s", rank, exc)
        return 1


def _serve(engine, groups, conn: Connection | None, local: bool) -> int:
    while True:
        batch = _broadcast(_next_batch(conn) if conn is not None else None, groups.control)
        if batch is None:
            return 0
        reply = _run(engine, groups, conn, batch)
        if conn is None:
            continue
        if local and isinstance(reply, Done):
            reply = Done(reply.batch_id, share_videos(reply.outputs))
        try:
            conn.send(reply)
        except BaseException:
            if isinstance(reply, Done):
                discard_videos(reply.outputs)
            raise


def _run(engine, groups, conn: Connection | None, batch: Batch):
    from ditserve.pipelines.base import RunControl

    stop = SyncedStop(groups, conn, batch.batch_id)

    def on_step(step: int, total: int) -> None:
        if conn is not None:
            conn.send(Progress(batch.batch_id, step, total))

    try:
        return Done(batch.batch_id, engine.run_batch(list(batch.requests), RunControl(should_stop=stop,
                                                                                       on_step=on_step)))
    except (Cancelled, InvalidRequest) as exc:  # decided alike on every rank: keep serving
        return _failure(batch.batch_id, exc)
    except Exception as exc:  # noqa: BLE001 - the ranks may now disagree: end the group
        log.exception("rank %d failed on batch %d", groups.rank, batch.batch_id)
        if conn is not None:
            conn.send(_failure(batch.batch_id, exc, fatal=True))
        _exit(1)


class SyncedStop:
    """`should_stop` for every rank: rank 0 reads the executor's cancels, everyone gets its answer."""

    def __init__(self, groups, conn: Connection | None, batch_id: int):
        self.groups, self.conn, self.batch_id = groups, conn, batch_id
        self.cancelled = False

    def __call__(self) -> bool:
        import torch
        import torch.distributed as dist

        if self.conn is not None:
            while not self.cancelled and self.conn.poll():
                message = self.conn.recv()
                self.cancelled = message is None or (isinstance(message, Cancel) and message.batch_id == self.batch_id)
        flag = torch.tensor([int(self.cancelled)])
        dist.broadcast(flag, src=0, group=self.groups.control)
        return bool(flag.item())


def _next_batch(conn: Connection) -> Batch | None:
    """Rank 0: the next batch; None when the executor says stop or is gone. Stale cancels (for a
    batch that already finished) are dropped."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return None
        if message is None or isinstance(message, Batch):
            return message


def _recv_setup(conn: Connection) -> Setup | None:
    try:
        message = conn.recv()
    except (EOFError, OSError):
        return None
    return message if isinstance(message, Setup) else None


def _broadcast(obj, group):
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def _connect(driver: tuple[str, int], authkey: bytes, timeout: float = 120.0) -> Connection:
    """Rank 0 → the executor; retried while the executor is still opening its port (torchrun)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Client(driver, authkey=authkey)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _failure(batch_id: int | None, exc: Exception, fatal: bool = False) -> Failed:
    if isinstance(exc, Cancelled):
        return Failed(batch_id, "cancelled", str(exc))
    if isinstance(exc, InvalidRequest):
        return Failed(batch_id, "invalid", exc.message, exc.param)
    return Failed(batch_id, "engine", f"{type(exc).__name__}: {exc}", fatal=fatal)


def _exit(code: int) -> None:
    """Leave at once: peers may be blocked in collectives that will never complete."""
    logging.shutdown()
    sys.stdout.flush()
    os._exit(code)


def _exit_with_parent(parent: int) -> None:
    """A locally started rank ends when the process that started it is gone."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        log.warning("the executor process %d is gone; exiting", parent)
        _exit(1)

    threading.Thread(target=watch, daemon=True, name="ditserve-parent-watch").start()


# -- entry points ----------------------------------------------------------------------------------

def _init(backend: str, device: str, **kwargs) -> None:
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group(backend, **kwargs)


def main_local(spec: RankSpec) -> int:
    import torch
    from torch.distributed import TCPStore

    _exit_with_parent(spec.parent)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    store = TCPStore(spec.store[0], spec.store[1], spec.world, False, STORE_TIMEOUT)
    backend = "nccl" if spec.device.startswith("cuda") else "gloo"
    _init(backend, spec.device, store=store, rank=spec.rank, world_size=spec.world)
    return run_rank(spec.device, spec.driver, spec.authkey, local=True)


def main_torchrun(driver: tuple[str, int], authkey: bytes, threads: int | None) -> int:
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    device = f"cuda:{dist.get_node_local_rank(fallback_rank=0)}" if cuda else "cpu"
    _init("nccl" if cuda else "gloo", device, init_method="env://")
    return run_rank(device, driver, authkey)


def main(argv: list[str] | None = None) -> None:
    from ditserve.config import env

    p = argparse.ArgumentParser(prog="python -m ditserve.runtime.ranks",
                                description="one rank of a ditserve parallel group")
    p.add_argument("--spec-stdin", action="store_true", help="started by the executor: RankSpec on stdin")
    p.add_argument("--driver", help="HOST:PORT where the executor waits for rank 0 (torchrun)")
    p.add_argument("--auth-key-file", help="the shared secret the executor reads too (torchrun)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    args = p.parse_args(argv)
    spec = pickle.load(sys.stdin.buffer) if args.spec_stdin else None
    level = spec.log_level if spec else env.log_level()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s rank %(process)d %(name)s: %(message)s")
    if spec is not None:
        code = main_local(spec)
    else:
        if not args.driver or not args.auth_key_file:
            p.error("give --spec-stdin, or --driver and --auth-key-file under torchrun")
        host, _, port = args.driver.rpartition(":")
        code = main_torchrun((host, int(port)), read_auth_key(args.auth_key_file), args.threads)
    _exit(code)


def read_auth_key(path: str) -> bytes:
    """The shared secret of a multi-machine group (the file's bytes, stripped; at least 16)."""
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < 16:
        raise InvalidRequest(f"{path}: the auth key must be at least 16 bytes", "auth_key_file")
    return key


if __name__ == "__main__":
    # run the module under its own name, so the messages pickle as ditserve.runtime.ranks.*
    from ditserve.runtime.ranks import main as _main

    _main()
