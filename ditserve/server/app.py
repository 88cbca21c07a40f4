"""The FastAPI app: its state, lifespan (worker, dispatch loop, output sweeping) and system routes."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import ditserve
from ditserve.api import DitserveError
from ditserve.config import EngineConfig
from ditserve.config.server import ServerConfig
from ditserve.runtime.loader import ModelSource
from ditserve.runtime.scheduler import Scheduler
from ditserve.runtime.worker import WorkerHandle
from ditserve.server import images, videos
from ditserve.server.admission import ClientLimiter
from ditserve.server.docs import docs_page, install_openapi_security
from ditserve.server.errors import documented, error_response, install_error_handlers
from ditserve.server.metrics import Metrics
from ditserve.server.middleware import Guard
from ditserve.server.schemas import ModelCard, ModelList
from ditserve.server.state import ServerState, model_not_found, state_of
from ditserve.server.jobs import JobStore
from ditserve.server.store import OutputStore

log = logging.getLogger(__name__)


def create_app(source: ModelSource, model_id: str, engine: EngineConfig, config: ServerConfig,
               log_level: str = "INFO") -> FastAPI:
    """An app serving `source`; its worker starts with the app's lifespan, not here."""
    limits = config.limits_for(source.limits, source.defaults)  # InvalidRequest: caps no request can meet
    worker = WorkerHandle(engine, slots=engine.max_batch_size, threads=config.worker_threads,
                          log_level=log_level)
    # batch_key is a class method: the server process never loads weights
    scheduler = Scheduler(worker, source.pipeline_cls.batch_key, max_queue=config.max_queue,
                          max_batch_size=engine.max_batch_size)
    metrics = Metrics(scheduler)
    store = OutputStore(config.output_ttl_s, config.output_dir, max_bytes=config.output_max_bytes)
    state = ServerState(source=source, model_id=model_id, config=config, limits=limits,
                        defaults=config.defaults_for(source.defaults, limits), worker=worker,
                        scheduler=scheduler, clients=ClientLimiter(config.client_limit), store=store,
                        metrics=metrics, created=int(time.time()))
    if limits.frame_multiple:  # a video model: durable jobs for /v1/videos
        state.jobs = metrics.jobs = JobStore(config.jobs_dir(), config.output_ttl_s,
                                             max_bytes=config.data_max_bytes)
        state.job_runner = videos.JobRunner(state)
    app = FastAPI(title="ditserve", version=ditserve.__version__, lifespan=_lifespan, docs_url=None,
                  redoc_url=None, description="OpenAI-compatible image generation with diffusion transformers.")
    app.state.ditserve = state
    install_error_handlers(app)
    install_openapi_security(app, secured=config.api_key is not None)
    app.include_router(system)
    app.include_router(images.router)
    app.include_router(videos.router)
    app.add_middleware(Guard, metrics=metrics, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
                       max_upload_bytes=config.max_upload_bytes, upload_paths=images.UPLOAD_PATHS,
                       json_paths=images.JSON_PATHS, json_or_form_paths=videos.JSON_OR_FORM_PATHS,
                       allowed_hosts=config.host_allow_list())
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    state: ServerState = app.state.ditserve
    tasks = [asyncio.create_task(state.scheduler.run(), name="ditserve-dispatch"),
             asyncio.create_task(_start_worker(state), name="ditserve-worker-start"),
             asyncio.create_task(_sweep(state.store), name="ditserve-sweep")]
    if state.jobs is not None:
        if recovered := state.job_runner.recover():
            log.info("%d unfinished video job(s) from an earlier server are back in the queue", recovered)
        tasks.append(asyncio.create_task(_sweep(state.jobs, state.config.output_ttl_s), name="ditserve-job-sweep"))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        if state.job_runner is not None:
            # a job stays in the store as queued/in_progress and runs again after a restart; the worker
            # stops the running one within a step instead of finishing a video nobody will store
            for job_id in list(state.job_runner.tasks):
                state.job_runner.cancel(job_id)
        await state.worker.stop()
        state.store.close()
        if state.jobs is not None:
            state.jobs.close()


async def _start_worker(state: ServerState) -> None:
    try:
        await state.worker.start()
    except DitserveError as exc:
        log.error("the worker could not load the model: %s", exc)
        state.on_fatal(str(exc))


async def _sweep(store: OutputStore | JobStore, ttl_s: float | None = None) -> None:
    """Delete expired outputs (or video jobs) now and then."""
    ttl_s = store.ttl_s if ttl_s is None else ttl_s
    while True:
        await asyncio.sleep(min(60.0, ttl_s / 2))
        if removed := store.sweep():
            log.info("removed %d expired %s", removed, "video jobs" if isinstance(store, JobStore) else "outputs")


system = APIRouter()


# HEAD as well as GET: load balancers and uptime checks probe with HEAD.
@system.api_route("/health", methods=["GET", "HEAD"], summary="The server process is alive")
async def health() -> dict:
    return {"status": "ok"}


@system.api_route("/ready", methods=["GET", "HEAD"], summary="The model is loaded and the server is not draining",
                  responses=documented(503))
async def ready(request: Request):
    state = state_of(request)
    if state.draining:
        return error_response(503, "the server is draining for shutdown", "server_error", None, "draining")
    if not state.worker.ready:
        return error_response(503, f"the worker is {state.worker.state}", "server_error", None,
                              "not_ready", retry_after=5)
    return JSONResponse({"status": "ready", "model": state.model_id})


@system.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
async def metrics(request: Request) -> Response:
    return Response(generate_latest(state_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


@system.get("/docs", include_in_schema=False, response_class=HTMLResponse)
async def docs(request: Request) -> HTMLResponse:
    return docs_page(request.app)


def _card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_id, created=state.created)


@system.get("/v1/models", response_model=ModelList, responses=documented(401))
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(state_of(request))])


@system.get("/v1/models/{model:path}", response_model=ModelCard, responses=documented(401, 404))
async def get_model(model: str, request: Request):
    state = state_of(request)
    if model != state.model_id:
        return model_not_found(model, state)
    return _card(state)
