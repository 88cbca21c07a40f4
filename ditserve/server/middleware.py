"""The ASGI layer in front of FastAPI: request metrics, Host, API key, content type, body size —
before any parsing."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import re
import time

from ditserve.server.errors import error_response
from ditserve.server.metrics import Metrics

log = logging.getLogger(__name__)

_CONTENT = re.compile(r"/v1/images/[^/]+/content")
JSON_TYPES = ("application/json",)
FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class Guard:
    """Counts and times every request; refuses a Host not in `allowed_hosts` (400: DNS rebinding), a
    wrong API key (401), a body of the wrong content type (415) and an oversized body (413).

    Only `/v1/` routes need the key, except stored-output content: its 128-bit random id is the
    capability, as OpenAI's image URLs work without a key.
    """

    def __init__(self, app, *, metrics: Metrics, api_key: str | None, max_body_bytes: int,
                 max_upload_bytes: int, upload_paths: frozenset[str], json_paths: frozenset[str],
                 allowed_hosts: frozenset[str] | None, json_or_form_paths: frozenset[str] = frozenset()):
        """`json_paths` take JSON (the body limit), `upload_paths` a form (the upload limit), and
        `json_or_form_paths` either (POST /v1/videos: the limit of whichever type is sent)."""
        self.app, self.metrics, self.api_key = app, metrics, api_key
        self.max_body_bytes, self.max_upload_bytes = max_body_bytes, max_upload_bytes
        self.upload_paths, self.json_paths = upload_paths | json_or_form_paths, json_paths
        self.json_or_form_paths = json_or_form_paths
        self.allowed_hosts = allowed_hosts

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
        refusal = self._host_refusal(scope) or self._key_refusal(scope, path) or self._type_refusal(scope, path)
        if refusal is not None:
            return await refusal(scope, receive, send)
        limit = self.max_upload_bytes if path in self.upload_paths and not (
            path in self.json_or_form_paths and _is_json(_content_type(scope))) else self.max_body_bytes
        length = _content_length(scope)
        if length is not None and length > limit:
            return await _too_large(length, limit)(scope, receive, send)
        if length is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body = await _read_at_most(receive, limit)
            if body is None:
                return await _too_large(None, limit)(scope, receive, send)
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _host_refusal(self, scope):
        host = _header(scope, b"host")
        if self.allowed_hosts is None or host is None or host_allowed(host, self.allowed_hosts):
            return None  # no Host at all: HTTP/1.0, never a browser
        log.debug("refused Host %r", host[:100])
        return error_response(400, f"Host {host[:100]!r} is not served here (allowed: "
                                   f"{', '.join(sorted(self.allowed_hosts))}, or an IP address; "
                                   "see --allowed-hosts)", "invalid_request_error", None, "invalid_host")

    def _key_refusal(self, scope, path: str):
        if self.api_key is None or not path.startswith("/v1/") or _CONTENT.fullmatch(path):
            return None
        if self._authorized(scope):
            return None
        return error_response(401, "Incorrect API key provided", "invalid_request_error", None, "invalid_api_key")

    def _type_refusal(self, scope, path: str):
        if scope["method"] != "POST":
            return None
        if path in self.json_paths:
            expected = JSON_TYPES
        elif path in self.json_or_form_paths:
            expected = JSON_TYPES + FORM_TYPES
        elif path in self.upload_paths:
            expected = FORM_TYPES
        else:
            return None
        given = _content_type(scope)
        if given in expected or (JSON_TYPES[0] in expected and _is_json(given)):
            return None
        return error_response(415, f"Content-Type must be {' or '.join(expected)}, got "
                                   f"{given[:100] or 'none'!r}", "invalid_request_error", None,
                              "unsupported_media_type")

    def _authorized(self, scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())


def _header(scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _content_type(scope) -> str:
    return (_header(scope, b"content-type") or "").partition(";")[0].strip().lower()


def _is_json(content_type: str) -> bool:
    return content_type in JSON_TYPES or content_type.endswith("+json")


def host_allowed(host: str, allowed: frozenset[str]) -> bool:
    """Whether a Host header value names this server: an allowed name (".example.com" also allows its
    subdomains) or an IP literal, with or without a port."""
    name = host.strip().lower()
    if name.startswith("["):  # [IPv6]:port
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name, _, port = name.partition(":")
        if not port.isdigit():
            return False
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name in allowed or any(a.startswith(".") and (name.endswith(a) or name == a[1:]) for a in allowed)


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
