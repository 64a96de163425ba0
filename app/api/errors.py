"""The one error shape of the HTTP API: `{"error": {"type", "message", ...}}` with the right status.

Route code raises `ApiError` (or a domain error that maps onto one); handlers here turn
every failure into that shape, so clients never parse two formats and bad input never
surfaces as a 500.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters_store import ArtifactConflict, ArtifactNotFound, CorruptArtifact, InvalidName, StoreError
from app.jobs import JobNotFound, JobStateError
from resa_engine.errors import (
    AdapterCacheFull,
    AdapterError,
    DatasetError,
    EngineStopped,
    ManifestError,
    ModelError,
    NumericalError,
    QueueFull,
    RequestCancelled,
    SkillError,
)

log = logging.getLogger("resa.api")


class ApiError(Exception):
    """An HTTP error with a machine-readable `type` and a one-line `message`."""

    status = 500
    type = "internal_error"

    def __init__(self, message: str, *, type: str | None = None, status: int | None = None, headers: dict | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        self.type = type or self.type
        self.status = status or self.status
        self.headers = headers
        self.extra = extra


class NotFound(ApiError):
    status, type = 404, "not_found"


class Conflict(ApiError):
    status, type = 409, "conflict"


class Invalid(ApiError):
    status, type = 422, "invalid_request"


class TooLarge(ApiError):
    status, type = 413, "too_large"


class Unauthorized(ApiError):
    status, type = 401, "unauthorized"

    def __init__(self, message: str, **extra: Any):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"}, **extra)


class Forbidden(ApiError):
    status, type = 403, "forbidden"


class Unavailable(ApiError):
    status, type = 503, "unavailable"


def error_body(type: str, message: str, request: Request | None = None, **extra: Any) -> dict:
    body: dict[str, Any] = {"type": type, "message": message, **extra}
    rid = getattr(getattr(request, "state", None), "request_id", None) if request is not None else None
    if rid:
        body["request_id"] = rid
    return {"error": body}


def error_response(
    request: Request | None, status: int, type: str, message: str, headers: dict | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(error_body(type, message, request, **extra), status_code=status, headers=headers)


def as_api_error(exc: BaseException) -> ApiError | None:
    """Domain errors raised below the routes, mapped onto HTTP (None: not a known domain error)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, JobNotFound):
        return NotFound(str(exc), type="unknown_job")
    if isinstance(exc, JobStateError):
        return Conflict(str(exc), type="job_state")
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return Unavailable(
            "the job queue (Redis) is unreachable; job routes are unavailable, generation still works", type="queue_unavailable"
        )
    if isinstance(exc, ArtifactNotFound):
        return NotFound(str(exc))
    if isinstance(exc, ArtifactConflict):
        return Conflict(str(exc))
    if isinstance(exc, InvalidName):
        return Invalid(str(exc), type="invalid_name")
    if isinstance(exc, CorruptArtifact):
        # 409, not 5xx: the request is fine and the server is healthy, but the artifact it names is
        # in a state that cannot serve it (a file no longer matches its manifest) until an operator
        # replaces it. A 503 would make clients and gateways retry, and could take a healthy replica
        # out of rotation; 422 would blame the request. The message names the artifact and the file.
        return Conflict(str(exc), type="artifact_corrupt")
    if isinstance(exc, StoreError):
        return ApiError(str(exc), type="store_error", status=500)
    if isinstance(exc, DatasetError):
        return Invalid(str(exc), type="invalid_dataset", problems=[{"line": n, "message": m} for n, m in exc.problems])
    if isinstance(exc, AdapterError):  # AdapterMismatch included: the adapter cannot serve this model
        return Conflict(str(exc), type="incompatible_adapter")
    if isinstance(exc, ManifestError):
        return Conflict(str(exc), type="artifact_corrupt")
    if isinstance(exc, SkillError):
        return Invalid(str(exc), type="incompatible_skill")
    if isinstance(exc, ModelError):
        return Invalid(str(exc), type="model_error")
    if isinstance(exc, NumericalError):
        return Invalid(str(exc), type="invalid_request")
    if isinstance(exc, QueueFull):
        retry = max(1, math.ceil(exc.retry_after_s))
        return ApiError(str(exc), type="rate_limit_exceeded", status=429, headers={"Retry-After": str(retry)})
    if isinstance(exc, EngineStopped):
        return Unavailable(str(exc), type="engine_stopped")
    if isinstance(exc, RequestCancelled):
        return ApiError(str(exc), type="cancelled", status=499)
    if isinstance(exc, AdapterCacheFull):
        return Unavailable(str(exc), type="adapter_cache_full")
    return None


DOMAIN_ERRORS = (ApiError, JobNotFound, JobStateError, redis.ConnectionError, redis.TimeoutError, StoreError, ValueError)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "message": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        first = errors[0] if errors else {"loc": [], "message": "invalid request"}
        where = ".".join(p for p in first["loc"] if p != "body") or "body"
        return error_response(request, 422, "invalid_request", f"{where}: {first['message']}", errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 401: "unauthorized", 403: "forbidden"}
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        headers = getattr(exc, "headers", None)
        return error_response(request, exc.status_code, kinds.get(exc.status_code, "http_error"), message, headers=headers)

    async def _domain(request: Request, exc: Exception) -> JSONResponse:
        api = as_api_error(exc)
        if api is None:
            log.exception("unhandled error on %s %s", request.method, request.url.path)
            api = ApiError("internal server error")
        elif (api.status >= 500 and api.status != 503) or api.type == "artifact_corrupt":  # operators must see these
            log.error("%s on %s %s: %s", api.type, request.method, request.url.path, api.message)
        return error_response(request, api.status, api.type, api.message, headers=api.headers, **api.extra)

    # Domain errors get their status here. Anything else is a bug: Starlette's server-error
    # middleware calls the same handler (a 500 in the same shape) and logs the traceback.
    for cls in (*DOMAIN_ERRORS, Exception):
        app.add_exception_handler(cls, _domain)
