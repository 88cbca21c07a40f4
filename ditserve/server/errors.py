"""Every failure leaves the server in OpenAI's envelope: {"error": {message, type, param, code}}."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from ditserve.api import EngineError, InvalidRequest, Overloaded
from ditserve.runtime.scheduler import Unavailable
from ditserve.runtime.worker import WorkerDied
from ditserve.server.admission import ClientLimited
from ditserve.server.store import OutputTooLarge

log = logging.getLogger(__name__)

# the request fields whose OpenAI name differs from GenerationRequest's
_PARAM_NAMES = {"height": "size", "width": "size", "num_images": "n"}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


class RequestTimedOut(Exception):
    """The request did not finish within --request-timeout."""


class ModelNotFound(Exception):
    """The request names a model this server does not serve."""

    def __init__(self, model: str, served: str):
        super().__init__(model)
        self.model, self.served = model, served


def model_not_found(model: str, served: str) -> JSONResponse:
    return error_response(404, f"The model '{model[:200]}' does not exist; this server serves '{served}'",
                          "invalid_request_error", "model", "model_not_found")


def _allowed_methods(request: Request) -> list[str]:
    """The methods of every route whose path matches the request's (Starlette's own 405 names only
    the first matching route's)."""
    from starlette.routing import Match

    methods = set()
    scope = {**request.scope, "method": "GET"}
    for route in request.app.router.routes:
        if getattr(route, "methods", None) and route.matches(scope)[0] != Match.NONE:
            methods |= set(route.methods)
    return sorted(methods)


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None, retry_after: float | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> JSONResponse:
    return error_response(400, message, "invalid_request_error", param, code)


# OpenAI-style envelopes documented on every route (schemathesis checks responses against them)
def documented(*statuses: int) -> dict:
    return {status: {"model": ErrorEnvelope, "description": _STATUS_TEXT[status]} for status in statuses}


_STATUS_TEXT = {
    400: "invalid request", 401: "missing or wrong API key", 404: "not found",
    413: "request body too large", 415: "wrong Content-Type for this route",
    429: "queue full, or this client's share of it in use; retry after Retry-After seconds",
    500: "engine failure", 503: "not ready or shutting down", 504: "request timed out",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    """One line naming the first bad field, as OpenAI words it."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path"):  # where FastAPI found it, not the parameter's name
        loc = loc[1:]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
    if kind == "missing" and param is None:
        return "The request body is empty; send a JSON object with at least 'prompt'", None, "invalid_json"
    if kind == "missing":
        return f"Missing required parameter: '{param}'", param, "missing_required_parameter"
    if kind == "string_pattern_mismatch" and param == "size":
        return (f"size must be 'WIDTHxHEIGHT' (e.g. 1024x1024) or 'auto', got {str(first.get('input'))[:100]!r}",
                param, "invalid_value")
    if kind in ("json_invalid", "json_type") or param is None:
        return f"The request body is not a valid JSON object: {first.get('msg')}", None, "invalid_json"
    return f"Invalid value for '{param}': {first.get('msg')}", param, "invalid_value"


def install_error_handlers(app: FastAPI) -> None:
    """Map ditserve's errors and FastAPI's own (422, 404, 405, body parse) to the envelope."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = _validation_message(exc)
        return invalid(message, param, code)

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest) -> JSONResponse:
        return invalid(exc.message, _PARAM_NAMES.get(exc.param, exc.param))

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        if isinstance(exc, Unavailable):
            return error_response(503, str(exc), "server_error", None, "unavailable", exc.retry_after)
        if isinstance(exc, ClientLimited):
            return error_response(429, str(exc), "rate_limit_error", None, "client_limit", exc.retry_after)
        return error_response(429, str(exc), "rate_limit_error", None, "queue_full", exc.retry_after)

    @app.exception_handler(ModelNotFound)
    async def _no_model(request: Request, exc: ModelNotFound) -> JSONResponse:
        return model_not_found(exc.model, exc.served)

    @app.exception_handler(RequestTimedOut)
    async def _timeout(request: Request, exc: RequestTimedOut) -> JSONResponse:
        return error_response(504, str(exc), "server_error", None, "timeout")

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        code = ("worker_died" if isinstance(exc, WorkerDied) else
                "output_too_large" if isinstance(exc, OutputTooLarge) else "engine_error")
        log.error("request failed: %s", exc)
        return error_response(500, str(exc), "server_error", None, code)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        codes = {400: "invalid_body", 404: "not_found", 405: "method_not_allowed"}
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = f"{message}: {request.method} {request.url.path[:200]}"
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        headers = exc.headers
        if exc.status_code == 405:  # every method of the path, when several routes share it
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
        return error_response(exc.status_code, message, type_, None,
                              codes.get(exc.status_code, f"http_{exc.status_code}"), headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error", None,
                              "internal_error")
