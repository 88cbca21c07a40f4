"""Running the app on uvicorn: a socket bound up front, bounded connections, and a SIGTERM that
drains before exiting."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn

from ditserve.api import InvalidRequest
from ditserve.server.protocol import guarded_protocol
from ditserve.server.state import ServerState

log = logging.getLogger(__name__)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free one. Raises InvalidRequest when the address is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise InvalidRequest(f"cannot listen on {host}:{port}: {exc.strerror}", "port") from None
    return sock


class DrainingServer(uvicorn.Server):
    """The first SIGTERM/SIGINT drains: /ready answers 503, new generations 503, queued and running
    requests finish, then the server exits (status 0). A second signal exits at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self.fatal: str | None = None
        self._draining = False
        state.on_fatal = self._on_fatal

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in uvicorn's captured signals, so a drained server is not re-killed by it.
        name = signal.Signals(sig).name
        if self._draining or self.should_exit:
            log.warning("%s again: exiting without waiting for running requests", name)
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        log.info("%s: draining (no new requests; waiting for queued and running ones)", name)
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))

    async def _drain(self) -> None:
        state = self.state
        state.draining = True
        state.scheduler.close()
        log.info("draining %d queued and %d running requests", state.scheduler.queue_length,
                 state.scheduler.running)
        try:
            await asyncio.wait_for(state.scheduler.wait_idle(), state.config.drain_timeout_s)
        except TimeoutError:
            log.warning("drain did not finish within %.0f s; exiting anyway", state.config.drain_timeout_s)
        self.should_exit = True

    def _on_fatal(self, message: str) -> None:
        self.fatal = message
        self.should_exit = True


def serve(app, state: ServerState, sock: socket.socket) -> str | None:
    """Serve until drained or stopped; returns the fatal error that stopped it, if any."""
    cfg = state.config
    config = uvicorn.Config(app, log_config=None, lifespan="on", timeout_graceful_shutdown=10,
                            http=guarded_protocol(cfg.header_timeout_s, cfg.max_connections),
                            forwarded_allow_ips=cfg.forwarded_allow_ips)
    server = DrainingServer(config, state)
    server.run(sockets=[sock])
    return server.fatal
