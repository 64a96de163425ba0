"""Structured logs: one JSON object per line, tagged with the request or job it belongs to.

Every line carries `ts` (UTC, ISO 8601), `level`, `logger`, `msg`, `request_id` (set by the
request-id middleware for the request being served), `job_id` (set around a job's task in
the worker and its job process), any `extra={...}` fields of the call, and `exc` when a
traceback is attached. `configure_logging()` installs the one handler on the root logger;
`resa serve`, `resa worker`, `create_app` and every job process call it.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json as _json
import logging
import os
import re
import sys

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("resa_request_id", default=None)
"""Id of the HTTP request being served (the middleware sets it; worker threads inherit it)."""

job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("resa_job_id", default=None)
"""Id of the background job being run (app.jobs sets it around the task)."""

HANDLER_NAME = "resa"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
# uvicorn's `color_message` repeats `msg` with terminal colours.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName", "color_message"}
_CONTEXT = ("request_id", "job_id")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # RQ colours some words when attached to a terminal


class ContextFilter(logging.Filter):
    """Stamps request_id and job_id from the context onto each record, in the thread that logs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get()
        if getattr(record, "job_id", None) is None:
            record.job_id = job_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, request_id, job_id, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": _ANSI.sub("", record.getMessage()),
            "request_id": getattr(record, "request_id", None),
            "job_id": getattr(record, "job_id", None),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, plus `[request_id=…]` / `[job_id=…]` when set."""

    def __init__(self):
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = _ANSI.sub("", super().format(record))
        tags = "".join(f" [{k}={v}]" for k in _CONTEXT if (v := getattr(record, k, None)) and str(v) not in line)
        return line + tags if "\n" not in line else line.replace("\n", tags + "\n", 1)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging(json: bool = True, level: str | int = "INFO") -> logging.Handler:
    """Install (or update) the service's one root handler: JSON lines, or plain text with `json=False`.

    Idempotent, and leaves other handlers alone (a test runner's capture, say). Raises
    ValueError for an unknown level name.
    """
    if isinstance(level, str):
        name = level.strip().upper()
        if name not in LEVELS:
            raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
        level = getattr(logging, name)
    root = logging.getLogger()
    handler = next((h for h in root.handlers if h.get_name() == HANDLER_NAME), None)
    if handler is None:
        handler = _StderrHandler()
        handler.set_name(HANDLER_NAME)
        handler.addFilter(ContextFilter())
        root.addHandler(handler)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root.setLevel(level)
    logging.captureWarnings(True)  # `warnings.warn` becomes a log line like any other
    if json:
        # Model libraries draw progress bars on stderr; they are not log lines (set before they are imported).
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return handler
