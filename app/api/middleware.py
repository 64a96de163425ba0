"""ASGI middleware: request ids, request metrics, authentication before any body is read, and the
request body size limit.

Pure ASGI (no BaseHTTPMiddleware) so streaming responses pass through untouched.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from starlette.exceptions import HTTPException

from app.api.errors import error_body
from app.logging import request_id_var

log = logging.getLogger("resa.api")
REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
"""Metric labels come from this fixed set (anything else is `OTHER`): a client never adds a time series."""
OPEN_PATHS = ("/livez", "/readyz", "/metrics", "/ui", "/docs", "/redoc", "/openapi.json")
"""Paths (and their subpaths) served without an API key: probes, the static page, the API's own docs."""


class RequestContext:
    """Gives every request an id (a sane incoming X-Request-ID, else a new one), echoes it in
    the response, logs the request, and records route/status/latency metrics."""

    def __init__(self, app: ASGIApp, metrics=None):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = incoming if REQUEST_ID_RE.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)  # every log line of this request, in threads too, carries the id
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - t0
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            if self.metrics is not None:
                self.metrics.observe_request(method, path, status["code"], elapsed)
            if path not in ("/livez", "/readyz", "/metrics"):
                log.info(
                    "%s %s -> %s in %.1f ms [%s]", method, scope["path"][:200], status["code"], elapsed * 1000, rid,
                    extra={"method": method, "path": scope["path"], "route": path, "status": status["code"],
                           "duration_ms": round(elapsed * 1000, 1)},
                )  # fmt: skip
            request_id_var.reset(token)


class AuthGate:
    """With API keys configured, a request without a valid key gets 401 before its body is read or parsed
    (a malformed body from an unauthenticated client is a 401, not a parse error). Which scope may do
    what is still decided per route (app/api/deps.py)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys = scope["app"].state.api_keys if scope["type"] == "http" else None
        path = scope.get("path", "")
        if not keys or any(path == p or path.startswith(p + "/") for p in OPEN_PATHS):
            return await self.app(scope, receive, send)
        from app.api.deps import key_scope
        from app.api.errors import Unauthorized

        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
        kind, _, token = header.partition(" ")
        try:
            if kind.lower() != "bearer":
                raise Unauthorized("missing API key: send `Authorization: Bearer <key>`")
            key_scope(keys, token)
        except Unauthorized as exc:
            return await _send_error(scope, send, 401, exc.type, exc.message, exc.headers)
        await self.app(scope, receive, send)


async def _send_error(scope: Scope, send: Send, status: int, type: str, message: str, headers: dict | None = None) -> None:
    """An error response in the API's shape, sent from middleware (before any route runs)."""
    import json

    body = error_body(type, message)
    rid = scope.get("state", {}).get("request_id")
    if rid:
        body["error"]["request_id"] = rid
    data = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413 in the API's error shape.

    A declared Content-Length over the limit is refused before reading; a chunked body is
    counted as it streams and refused as soon as it passes the limit.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                return await self._refuse(scope, send, declared)
        seen = {"bytes": 0}

        async def limited() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > self.max_bytes:
                    # Starlette's HTTPException: FastAPI re-raises it from body parsing (anything
                    # else would become a 400), and the error handlers give it the usual shape.
                    raise HTTPException(413, f"request body is over the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, limited, send)

    async def _refuse(self, scope: Scope, send: Send, size: int) -> None:
        await _send_error(scope, send, 413, "body_too_large", f"request body of {size} bytes is over the limit of {self.max_bytes} bytes")
