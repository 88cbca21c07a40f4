"""What the routes share: the server's state, and the answers more than one route gives."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import JSONResponse

from ditserve.api import ModelLimits, RequestDefaults
from ditserve.config.server import ServerConfig
from ditserve.runtime.loader import ModelSource
from ditserve.runtime.scheduler import Scheduler
from ditserve.runtime.worker import WorkerHandle
from ditserve.server.admission import ClientLimiter
from ditserve.server import errors
from ditserve.server.metrics import Metrics
from ditserve.server.jobs import JobStore
from ditserve.server.store import OutputStore

if TYPE_CHECKING:
    from ditserve.server.videos import JobRunner


@dataclass
class ServerState:
    """Everything the routes share; one per app, built by `create_app`."""

    source: ModelSource
    model_id: str
    config: ServerConfig
    limits: ModelLimits  # the model's, under the server's caps
    defaults: RequestDefaults  # the model's, lowered to fit those caps
    worker: WorkerHandle
    scheduler: Scheduler
    clients: ClientLimiter
    store: OutputStore
    metrics: Metrics
    created: int
    jobs: JobStore | None = None  # video jobs (a video model only)
    job_runner: "JobRunner | None" = None
    draining: bool = False
    # Called when the first worker cannot load the model; the runner then stops the server.
    on_fatal: Callable[[str], None] = lambda message: None


def state_of(request: Request) -> ServerState:
    return request.app.state.ditserve


def model_not_found(model: str, state: ServerState) -> JSONResponse:
    return errors.model_not_found(model, state.model_id)
