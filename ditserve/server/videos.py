"""`/v1/videos`: OpenAI's Videos API as durable, cancellable jobs (for a video model).

A job is created by POST (JSON, or multipart as the official client sends it, with an optional
`input_reference` image), lives in the SQLite job store (server/jobs.py), and runs through the same
scheduler as image requests. Unlike an image request it does not belong to its connection: the
client polls `GET /v1/videos/{id}` (status, progress updated every denoising step) and downloads
`/content` (MP4, a first-frame thumbnail, or a spritesheet). DELETE cancels a queued or running job
(the worker stops within one step) and removes it.

How `seconds` and `fps` become frames: `num_frames`, when given, wins; otherwise
`num_frames = m * round(seconds * fps / m) + 1` with the model's frame multiple m (4 for Wan), so
5 seconds at 16 fps is 81 frames; too many frames for the model is a 400.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import time
from dataclasses import asdict, fields

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ditserve.api import Cancelled, DitserveError, GenerationRequest, InvalidRequest, Overloaded
from ditserve.api.images import read_image
from ditserve.server.errors import ModelNotFound, documented, error_response
from ditserve.server.jobs import VARIANTS, Job, JobTooLarge
from ditserve.server.schemas import VideoCreateBody, VideoDeleted, VideoList, VideoObject, parse_size, videos_openapi
from ditserve.server.state import ServerState, state_of

log = logging.getLogger(__name__)

router = APIRouter()
JSON_OR_FORM_PATHS = frozenset({"/v1/videos"})  # JSON (--max-body-bytes) or multipart (--max-upload-bytes)
_MEDIA = {"video": "video/mp4", "thumbnail": "image/webp", "spritesheet": "image/jpeg"}
_REQUEST_FIELDS = {f.name for f in fields(GenerationRequest)} - {"images"}


def frames_for(seconds: float, fps: int, multiple: int) -> int:
    """The valid frame count closest to `seconds` of video at `fps` (multiple * k + 1, k >= 0)."""
    return multiple * max(0, round(seconds * fps / multiple)) + 1


@router.post("/v1/videos", responses={200: {"model": VideoObject}, **documented(400, 401, 404, 413, 415, 429)},
             openapi_extra=videos_openapi())
async def create(request: Request):
    """Create a video job (OpenAI's `videos.create`)."""
    state = state_of(request)
    if not state.limits.frame_multiple:
        raise InvalidRequest(f"the loaded model makes images ({state.source.class_name}); use "
                             "/v1/images/generations, or serve a video model for /v1/videos", "model")
    runner = state.job_runner
    runner.check_room()  # a full queue costs nothing: before the upload is read
    body, image = await _body(request, state)
    resolved = _resolved(state, body, image)
    seconds = body.seconds or f"{resolved.num_frames / resolved.fps:g}"
    runner.check_room()  # again: other jobs may have come in while this upload was read
    client = request.client.host if request.client else "unknown"
    state.clients.take(client, state.scheduler.retry_after())  # released when the job ends
    try:
        job = state.jobs.create(state.model_id, f"{resolved.width}x{resolved.height}", seconds,
                                _request_fields(resolved), image)
    except BaseException:
        state.clients.release(client)
        raise
    runner.start(job, client)
    return JSONResponse(video_object(state.jobs.get(job.id), prompt=resolved.prompt))


async def _body(request: Request, state: ServerState) -> tuple[VideoCreateBody, bytes | None]:
    """The fields (JSON, or form fields as text) and the input image's bytes, if any."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    image = None
    try:
        if kind == "application/json" or kind.endswith("+json"):
            return VideoCreateBody.model_validate_json(await request.body()), None
        if kind not in ("multipart/form-data", "application/x-www-form-urlencoded"):
            return _unsupported(kind)
        async with request.form(max_files=1, max_fields=64) as form:
            fields_, files = {}, []
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    files.append((name, value))
                else:
                    fields_[name] = value
            for name, upload in files:
                if name != "input_reference":
                    raise InvalidRequest(f"unexpected file field {name!r}; the image goes in 'input_reference'", name)
                image = await upload.read()
            body = VideoCreateBody.model_validate(fields_)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    if image is not None:
        await asyncio.to_thread(read_image, image, "input_reference", state.limits)
    return body, image


def _unsupported(kind: str):
    raise InvalidRequest(f"content type {kind or 'none'!r} is not supported here; send application/json "
                         "or multipart/form-data", "content-type")


def _resolved(state: ServerState, body: VideoCreateBody, image: bytes | None) -> GenerationRequest:
    if body.model is not None and body.model != state.model_id:
        raise ModelNotFound(body.model, state.model_id)
    width, height = parse_size(body.size)
    fps = body.fps or state.defaults.fps
    num_frames = body.num_frames
    if num_frames is None and body.seconds is not None:
        try:
            seconds = float(body.seconds)
        except ValueError:
            raise InvalidRequest(f"seconds must be a number, got {body.seconds!r}", "seconds") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise InvalidRequest(f"seconds must be > 0, got {body.seconds!r}", "seconds")
        num_frames = frames_for(seconds, fps, state.limits.frame_multiple)
    images = () if image is None else (_open(image),)
    req = GenerationRequest(
        prompt=body.prompt, negative_prompt=body.negative_prompt, height=height, width=width,
        num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
        guidance_scale_2=body.guidance_scale_2, seed=body.seed, num_frames=num_frames, fps=fps,
        sampler=body.sampler, flow_shift=body.flow_shift, images=images, cache=body.cache is not False,
        use_dynamic_cfg=body.use_dynamic_cfg)
    return req.resolve(state.defaults, state.limits)


def _open(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def _request_fields(req: GenerationRequest) -> dict:
    return {k: v for k, v in asdict(req).items() if k in _REQUEST_FIELDS}


def video_object(job: Job, prompt: str | None = None) -> dict:
    """The job as OpenAI's Video object, plus ditserve's `seed` and `timings`."""
    return {"id": job.id, "object": "video", "model": job.model, "status": job.status, "progress": job.progress,
            "created_at": job.created_at, "completed_at": job.completed_at, "expires_at": job.expires_at,
            "size": job.size, "seconds": job.seconds, "prompt": prompt or job.request.get("prompt"),
            "error": job.error, "remixed_from_video_id": None, "seed": job.seed, "timings": job.timings}


def _jobs(request: Request):
    """The job store, or a 400 when the served model makes images (it has none)."""
    state = state_of(request)
    if state.jobs is None:
        raise InvalidRequest(f"the loaded model makes images ({state.source.class_name}); video jobs need a "
                             "video model", "model")
    return state.jobs


def _not_found(video_id: str) -> JSONResponse:
    return error_response(404, f"no video job {video_id[:80]!r} (unknown, deleted or expired id)",
                          "invalid_request_error", "video_id", "not_found")


@router.get("/v1/videos", responses={200: {"model": VideoList}, **documented(400, 401)})
async def list_videos(request: Request, after: str | None = None, limit: int = 20, order: str = "desc"):
    """Jobs, newest first by default (`after`, `limit` 1-100, `order` asc|desc)."""
    if not 1 <= limit <= 100:
        raise InvalidRequest(f"limit must be between 1 and 100, got {limit}", "limit")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be 'asc' or 'desc', got {order!r}", "order")
    try:
        jobs, more = _jobs(request).list(after, limit, order)
    except KeyError:
        raise InvalidRequest(f"after: no video job {after[:80]!r}", "after") from None
    data = [video_object(j) for j in jobs]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


@router.get("/v1/videos/{video_id}", responses={200: {"model": VideoObject}, **documented(400, 401, 404)})
async def retrieve(video_id: str, request: Request):
    job = _jobs(request).get(video_id)
    return _not_found(video_id) if job is None else video_object(job)


@router.get("/v1/videos/{video_id}/content", responses={200: {"content": {t: {} for t in _MEDIA.values()}},
                                                        **documented(400, 401, 404)})
async def content(video_id: str, request: Request, variant: str = "video"):
    """The finished video (MP4), a thumbnail of its first frame (WebP) or a spritesheet (JPEG)."""
    if variant not in VARIANTS:
        raise InvalidRequest(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}", "variant")
    jobs = _jobs(request)
    job = jobs.get(video_id)
    if job is None:
        return _not_found(video_id)
    if job.status != "completed":
        return error_response(400, f"video {job.id} is {job.status}; content exists once it is completed",
                              "invalid_request_error", "video_id", "video_not_ready")
    return Response(jobs.content_path(job.id, variant).read_bytes(), media_type=_MEDIA[variant])


@router.delete("/v1/videos/{video_id}", responses={200: {"model": VideoDeleted}, **documented(400, 401, 404)})
async def delete(video_id: str, request: Request):
    """Delete a job and its files; a queued or running job is cancelled first."""
    state = state_of(request)
    job = _jobs(request).get(video_id)
    if job is None:
        return _not_found(video_id)
    state.job_runner.cancel(job.id)
    state.jobs.delete(job.id)
    return {"id": job.id, "object": "video.deleted", "deleted": True}


@router.post("/v1/videos/{video_id}/remix", responses=documented(400, 401))
async def remix(video_id: str, request: Request):
    raise InvalidRequest("remix is not supported: the served models generate from a prompt (and an input "
                         "image), not from an earlier video; create a new video instead", "video_id")


class JobRunner:
    """Runs each job as a background task: submit to the scheduler, follow its progress, store the
    content. Tasks are independent of HTTP connections; `cancel` stops one within a step.

    Jobs count against `--max-queue` from their creation (a job not yet handed to the scheduler is
    counted as queued) and against their client's share (`--max-client-requests`) until they end."""

    def __init__(self, state: ServerState, poll_s: float = 0.2):
        self.state, self.poll_s = state, poll_s
        self.tasks: dict[str, asyncio.Task] = {}
        self.tickets: dict = {}
        self.unsubmitted: set[str] = set()  # started, not yet in the scheduler's queue
        self._clients: dict[str, str] = {}  # job id -> the client whose share it holds

    def check_room(self) -> None:
        """Overloaded (429) when the queue, counting jobs not yet handed to the scheduler, is full;
        Unavailable (503) while draining."""
        scheduler = self.state.scheduler
        scheduler.check_room()
        waiting = scheduler.queue_length + len(self.unsubmitted)
        if waiting >= scheduler.max_queue:
            raise Overloaded(f"the queue is full ({waiting} requests and video jobs waiting); retry later",
                             retry_after=scheduler.retry_after())

    def start(self, job: Job, client: str | None = None) -> None:
        """Run `job` in the background; `client` (whose share the job holds) is released when it ends."""
        self.unsubmitted.add(job.id)
        if client is not None:
            self._clients[job.id] = client
        task = asyncio.create_task(self._run(job), name=f"job-{job.id}")
        self.tasks[job.id] = task
        # a callback, not the task's finally: a task cancelled before it first runs never enters its body
        task.add_done_callback(lambda _: self._ended(job.id))

    def _ended(self, job_id: str) -> None:
        self.unsubmitted.discard(job_id)
        client = self._clients.pop(job_id, None)
        if client is not None:
            self.state.clients.release(client)

    def recover(self) -> int:
        """Re-queue the jobs an earlier server left unfinished (see jobs.py)."""
        jobs = self.state.jobs.recover()
        for job in jobs:
            self.start(job)
        return len(jobs)

    def cancel(self, job_id: str) -> None:
        ticket = self.tickets.pop(job_id, None)
        if ticket is not None:
            self.state.scheduler.cancel(ticket)
        task = self.tasks.pop(job_id, None)
        if task is not None:
            task.cancel()

    async def _run(self, job: Job) -> None:
        jobs, started = self.state.jobs, time.monotonic()
        try:
            request = self._request(job)
            ticket = await self._submit(request)
            self.unsubmitted.discard(job.id)
            self.tickets[job.id] = ticket
            output = await self._follow(job, ticket)
            await asyncio.to_thread(self._store, job, output)
            jobs.update(job.id, status="completed", progress=100, completed_at=int(time.time()),
                        seed=output.seed, timings=output.timings.to_dict())
            self.state.metrics.observe_job("completed", time.monotonic() - started)
            self.state.metrics.observe_steps(output.timings.steps)
        except (asyncio.CancelledError, Cancelled):
            raise
        except asyncio.TimeoutError:
            self._fail(job, "timeout", f"the job did not finish within {self.state.config.job_timeout_s:g} s "
                                       "of starting (--job-timeout)")
        except JobTooLarge as exc:
            self._fail(job, "output_too_large", str(exc))
        except DitserveError as exc:
            self._fail(job, "generation_failed", str(exc))
        except Exception as exc:  # noqa: BLE001 - a job fails alone; the server keeps serving
            log.exception("video job %s failed", job.id)
            self._fail(job, "internal_error", f"{type(exc).__name__}: {exc}")
        finally:
            self.tickets.pop(job.id, None)
            self.tasks.pop(job.id, None)

    def _request(self, job: Job) -> GenerationRequest:
        images = ()
        path = self.state.jobs.input_path(job.id)
        if path.exists():
            images = (_open(path.read_bytes()),)
        return GenerationRequest(**job.request, images=images)

    async def _submit(self, request: GenerationRequest):
        while True:  # recovered jobs may outnumber the queue's room: wait for it
            try:
                return self.state.scheduler.submit(request)
            except DitserveError:
                await asyncio.sleep(1.0)

    async def _follow(self, job: Job, ticket):
        """Wait for the ticket, writing progress (0-99 while running) every poll; the job's time limit
        counts from when the worker takes it (time queued behind other jobs does not count)."""
        timeout, last = self.state.config.job_timeout_s, None
        while not ticket.future.done():
            started = ticket.started_at  # monotonic; None again if its batch went back to the queue
            if started is not None and time.monotonic() > started + timeout:
                self.state.scheduler.cancel(ticket)
                raise asyncio.TimeoutError
            status = "in_progress" if ticket.started_at is not None else "queued"
            progress = min(99, 100 * ticket.step // ticket.total_steps) if ticket.total_steps else 0
            if (status, progress) != last:
                self.state.jobs.update(job.id, status=status, progress=progress)
                last = (status, progress)
            await asyncio.wait({ticket.future}, timeout=self.poll_s)
        return ticket.future.result()

    def _store(self, job: Job, output) -> None:
        """Write the job's content, then delete the oldest finished jobs past --data-max-bytes (this
        job's content alone past it: removed again, and the job fails)."""
        from ditserve.runtime.video_io import encode_video, spritesheet, thumbnail

        jobs, frames = self.state.jobs, output.videos[0]
        jobs.put_content(job.id, "video", encode_video(frames, output.fps, "mp4"))
        jobs.put_content(job.id, "thumbnail", thumbnail(frames))
        jobs.put_content(job.id, "spritesheet", spritesheet(frames))
        try:
            jobs.make_room(job.id)
        except JobTooLarge:
            for variant in VARIANTS:
                jobs.content_path(job.id, variant).unlink(missing_ok=True)
            raise

    def _fail(self, job: Job, code: str, message: str) -> None:
        log.warning("video job %s failed: %s", job.id, message)
        self.state.jobs.update(job.id, status="failed", completed_at=int(time.time()),
                               error={"code": code, "message": message})
        self.state.metrics.observe_job("failed", 0.0)
