"""`/v1/images/*`: generations, edits (for a model that edits), stored content."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from ditserve.api import GenerationOutput, GenerationRequest, InvalidRequest
from ditserve.api.images import read_image
from ditserve.runtime.scheduler import Ticket
from ditserve.server.errors import ModelNotFound, RequestTimedOut, documented, error_response
from ditserve.server.schemas import (MEDIA_TYPES, ImageData, ImageEditBody, ImageGenerationBody, ImagesResponse,
                                     TimingsBody, edits_openapi)
from ditserve.server.state import ServerState, state_of

log = logging.getLogger(__name__)

router = APIRouter()
UPLOAD_PATHS = frozenset({"/v1/images/edits"})
JSON_PATHS = frozenset({"/v1/images/generations"})
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads this answer


_ANSWERS = documented(400, 401, 404, 413, 415, 429, 500, 503, 504)


@router.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
             responses=_ANSWERS)
async def generations(body: ImageGenerationBody, request: Request):
    """Generate images from a prompt (OpenAI's Images API)."""
    state = state_of(request)
    _images_only(state)
    resolved = _resolved(state, body, body.to_request(transparent=state.limits.max_layers > 0))  # a bad request is a 400 even when the queue is full
    with _admitted(request, state):
        return await _generate(request, state, body, resolved)


@router.post("/v1/images/edits", response_model=ImagesResponse, response_model_exclude_none=True,
             responses=_ANSWERS, openapi_extra=edits_openapi())
async def edits(request: Request):
    """Edit images (multipart: image or image[], prompt, ...), with a model that edits."""
    state = state_of(request)
    _images_only(state)
    if not state.limits.max_images:  # answered before the upload is parsed
        raise InvalidRequest(f"the loaded model does not edit images ({state.source.class_name} generates "
                             "from text only); serve an image-editing model for /v1/images/edits", "image")
    with _admitted(request, state):  # before the upload is parsed and decoded: a full queue costs nothing
        async with request.form(max_files=state.limits.max_images + 1, max_fields=64) as form:
            body, uploads = _edit_fields(form)
            images = []
            for i, upload in enumerate(uploads):
                name = f"image {i + 1} ({upload.filename or 'unnamed'})"
                images.append(await asyncio.to_thread(_checked_upload, await upload.read(), name, state.limits))
        if state.limits.max_layers and body.output_format == "jpeg":
            raise InvalidRequest("output_format jpeg has no alpha channel; the layered model's RGBA layers "
                                 "come as png or webp", "output_format")
        return await _generate(request, state, body, _resolved(state, body, body.to_request(tuple(images), state.limits.max_layers > 0)))


def _images_only(state: ServerState) -> None:
    if state.limits.frame_multiple:
        raise InvalidRequest(f"the loaded model makes videos ({state.source.class_name}); create a video job "
                             "with POST /v1/videos", "model")


@contextmanager
def _admitted(request: Request, state: ServerState) -> Iterator[None]:
    """Room in the queue and in this client's share of it, or Overloaded (429/503), before any work."""
    state.scheduler.check_room()
    client = request.client.host if request.client else "unknown"
    with state.clients.hold(client, state.scheduler.retry_after()):
        yield


def _checked_upload(data: bytes, name: str, limits) -> Image.Image:
    """The upload decoded once to check it (a corrupt file is a 400 now, not a failure in the worker),
    then reopened lazily: the queued request holds the compressed bytes, the worker decodes them."""
    read_image(data, name, limits)
    return Image.open(io.BytesIO(data))


def _edit_fields(form) -> tuple[ImageEditBody, list[UploadFile]]:
    files = [(name, value) for name, value in form.multi_items() if isinstance(value, UploadFile)]
    if any(name == "mask" for name, _ in files):
        raise InvalidRequest("mask (inpainting) is not supported by the loaded model; send image only", "mask")
    unknown = [name for name, _ in files if name not in ("image", "image[]")]
    if unknown:
        raise InvalidRequest(f"unexpected file field {unknown[0]!r}; images go in 'image' or 'image[]'", unknown[0])
    try:
        body = ImageEditBody.model_validate({k: v for k, v in form.multi_items() if isinstance(v, str)})
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    return body, [upload for _, upload in files]


def _resolved(state: ServerState, body: ImageGenerationBody, unresolved: GenerationRequest) -> GenerationRequest:
    """The request with the server's defaults, checked against its limits; ModelNotFound or InvalidRequest."""
    if body.model is not None and body.model != state.model_id:
        raise ModelNotFound(body.model, state.model_id)
    return unresolved.resolve(state.defaults, state.limits)


async def _generate(request: Request, state: ServerState, body: ImageGenerationBody, resolved: GenerationRequest):
    """Queue, wait, encode: the part generations and edits share."""
    ticket = state.scheduler.submit(resolved)
    output = await _wait(request, state, ticket)
    if output is None:
        return Response(status_code=CLIENT_GONE)
    state.metrics.observe_generation(ticket, output.timings.stages)
    fmt = body.output_format or "png"
    encoded = await asyncio.to_thread(_encode_all, output, fmt, body.output_compression)
    if body.response_format == "url":
        stored = [state.store.put(b, MEDIA_TYPES[fmt]) for b in encoded]
        data = [ImageData(url=_content_url(request, state, s.id)) for s in stored]
    else:
        data = [ImageData(b64_json=base64.b64encode(b).decode("ascii")) for b in encoded]
    timings = output.timings
    return ImagesResponse(
        created=int(time.time()), data=data, output_format=fmt, size=f"{resolved.width}x{resolved.height}",
        seed=output.seed,
        timings=TimingsBody(queue_s=ticket.queue_s, total_s=timings.total_s, stages=timings.stages,
                            mean_step_s=timings.to_dict()["mean_step_s"], batch_images=ticket.batch_images,
                            cache=None if timings.cache is None else timings.cache.to_dict(),
                            peak_memory_gib=timings.peak_memory_gib),
    )


def _content_url(request: Request, state: ServerState, image_id: str) -> str:
    """The stored image's URL: under --public-url when given, else from the (allow-listed) Host."""
    if state.config.public_url is None:
        return str(request.url_for("image_content", image_id=image_id))
    return state.config.public_url.rstrip("/") + request.app.url_path_for("image_content", image_id=image_id)


async def _wait(request: Request, state: ServerState, ticket: Ticket) -> GenerationOutput | None:
    """The ticket's output; None if the client went away; RequestTimedOut after the timeout.

    Either way the ticket is cancelled, so the worker stops between denoising steps.
    """
    gone = asyncio.ensure_future(_disconnected(request))
    timeout = state.config.request_timeout_s
    try:
        done, _ = await asyncio.wait({ticket.future, gone}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        state.scheduler.cancel(ticket)
        raise
    finally:
        gone.cancel()
    if ticket.future.done() and not ticket.future.cancelled():
        return ticket.future.result()  # raises the engine's error, if any
    state.scheduler.cancel(ticket)
    if gone in done:
        log.info("client went away; request %d cancelled", ticket.seq)
        return None
    raise RequestTimedOut(f"the request did not finish within {timeout:g} s (--request-timeout)")


async def _disconnected(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _encode_all(output: GenerationOutput, fmt: str, compression: int | None) -> list[bytes]:
    encoded = []
    for image in output.images:
        buffer = io.BytesIO()
        if fmt == "png":
            image.save(buffer, format="PNG")
        else:
            image.save(buffer, format=fmt.upper(), quality=95 if compression is None else compression)
        encoded.append(buffer.getvalue())
    return encoded


@router.get("/v1/images/{image_id}/content", name="image_content",
            responses={200: {"content": {t: {} for t in MEDIA_TYPES.values()}}, **documented(404)})
async def image_content(image_id: str, request: Request) -> Response:
    """A stored image from a `response_format=url` answer, until its time to live runs out."""
    state = state_of(request)
    stored = state.store.get(image_id)
    if stored is None:
        return error_response(404, "no such image (unknown or expired id)", "invalid_request_error",
                              "image_id", "not_found")
    # Read now: the sweeper may delete the file once it expires.
    return Response(stored.path.read_bytes(), media_type=stored.media_type,
                    headers={"Cache-Control": f"private, max-age={int(state.config.output_ttl_s)}"})
