"""The ASGI layer in front of FastAPI: request metrics, API key, body size — before any parsing."""

from __future__ import annotations

import hmac
import re
import time

from ditserve.server.errors import error_response
from ditserve.server.metrics import Metrics

_CONTENT = re.compile(r"/v1/images/[^/]+/content")


class Guard:
    """Counts and times every request; refuses a wrong API key (401) and an oversized body (413).

    Only `/v1/` routes need the key, except stored-output content: its 128-bit random id is the
    capability, as OpenAI's image URLs work without a key.
    """

    def __init__(self, app, *, metrics: Metrics, api_key: str | None, max_body_bytes: int,
                 max_upload_bytes: int, upload_paths: frozenset[str]):
        self.app, self.metrics, self.api_key = app, metrics, api_key
        self.max_body_bytes, self.max_upload_bytes = max_body_bytes, max_upload_bytes
        self.upload_paths = upload_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = [500]

        async def send_recording(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_recording)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)

    async def _guarded(self, scope, receive, send):
        path = scope["path"]
        if self.api_key is not None and path.startswith("/v1/") and not _CONTENT.fullmatch(path):
            if not self._authorized(scope):
                return await error_response(401, "Incorrect API key provided", "invalid_request_error",
                                            None, "invalid_api_key")(scope, receive, send)
        limit = self.max_upload_bytes if path in self.upload_paths else self.max_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            return await _too_large(length, limit)(scope, receive, send)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body = await _read_at_most(receive, limit)
            if body is None:
                return await _too_large(None, limit)(scope, receive, send)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _content_length(scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _too_large(length: int | None, limit: int):
    size = f"{length} bytes" if length is not None else "larger than that"
    return error_response(413, f"the request body is {size}; the limit is {limit} bytes",
                          "invalid_request_error", None, "request_too_large")


async def _read_at_most(receive, limit: int) -> bytes | None:
    """A chunked body, or None once it passes `limit` bytes."""
    chunks, total = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
