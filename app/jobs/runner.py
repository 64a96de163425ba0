"""What runs in a job's work horse: the RQ job function, progress into job meta, cancellation and
shutdown flags the task polls, and the failure callback that records why and cancels dependents."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable

import redis
from rq.job import Job
from rq.job import Retry as JobRetry

from app.jobs.queue import cancel_dependents, cancel_key
from app.jobs.views import iso, job_view, now_utc
from app.logging import configure_logging, job_id_var
from app.settings import get_settings

log = logging.getLogger("resa.jobs")

TASK_FUNCTIONS = {
    "source": "app.tasks.source:run_source",
    "extract": "app.tasks.extract:run_extract",
    "tune": "app.tasks.tune:run_tune",
    "eval": "app.tasks.evaluate:run_eval",
}
"""Job kind -> the task function (`module:function`) a worker runs for it."""
STOP_POLL_S = 0.5
JOB_STOP_SIGNAL = signal.SIGUSR1
"""What a worker sends its work horse to make the running task stop at its next step (shutdown)."""
SHUTDOWN_REASON = "worker shut down; resumable from checkpoint"
MAX_SHUTDOWN_REQUEUES = 5
"""A job interrupted by this many worker shutdowns in a row fails (with SHUTDOWN_REASON) instead of going back to the queue."""
PROGRESS_MIN_INTERVAL_S = 0.5


def _import(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class MetaProgress:
    """Engine progress callback -> `job.meta["progress"]`, rate-limited, never failing the job."""

    def __init__(self, job: Job, min_interval_s: float = PROGRESS_MIN_INTERVAL_S):
        self.job, self.min_interval_s = job, min_interval_s
        self._last, self._stage = 0.0, None

    def __call__(self, progress: Any) -> None:
        now = time.monotonic()
        data = progress.to_dict() if hasattr(progress, "to_dict") else dict(progress)
        final = data.get("total") is not None and data.get("step", 0) >= data.get("total", 0)
        if data.get("stage") == self._stage and not final and now - self._last < self.min_interval_s:
            return
        self._last, self._stage = now, data.get("stage")
        self.job.meta["progress"] = data
        try:
            self.job.save_meta()
        except redis.RedisError as exc:  # progress is advisory; the work goes on
            log.warning("job %s: cannot save progress: %s", self.job.id, exc)


_SHUTDOWN = threading.Event()  # set in the work horse when its worker is shutting down


def _on_stop_signal(signum, frame) -> None:
    _SHUTDOWN.set()


class CancelFlag:
    """`should_stop` for the engine: True once `resa:cancel:<id>` is set (checked at most every STOP_POLL_S)
    or once the worker running the job asked it to stop because it is shutting down."""

    def __init__(self, connection: redis.Redis, job_id: str, poll_s: float = STOP_POLL_S):
        self.connection, self.key, self.poll_s = connection, cancel_key(job_id), poll_s
        self._checked, self._value = 0.0, False

    def __call__(self) -> bool:
        return self.shutdown() or self.requested()

    @staticmethod
    def shutdown() -> bool:
        """The worker is shutting down (no Redis needed: it comes as a signal)."""
        return _SHUTDOWN.is_set()

    def requested(self) -> bool:
        """Someone asked to cancel this job (DELETE /jobs/{id})."""
        now = time.monotonic()
        if not self._value and now - self._checked >= self.poll_s:
            self._checked = now
            try:
                self._value = bool(self.connection.exists(self.key))
            except redis.RedisError:
                pass
        return self._value

    def requested_now(self) -> bool:
        """`requested()` without the poll interval; a Redis error counts as no."""
        try:
            return bool(self.connection.exists(self.key))
        except redis.RedisError:
            return False

    def reason(self) -> str:
        try:
            raw = self.connection.get(self.key)
            return json.loads(raw)["reason"] if raw else "canceled"
        except (redis.RedisError, ValueError, KeyError, TypeError):
            return "canceled"


class WorkerWatch(threading.Thread):
    """Ends the work horse when its worker process is gone.

    The worker heartbeats the job and records how it ended; a horse whose worker died
    has nobody doing either. It exits, so the job is reported failed ("worker died")
    instead of running on unseen, and its GPU memory is freed.
    """

    def __init__(self, poll_s: float = 1.0):
        super().__init__(name="worker-watch", daemon=True)
        self.parent, self.poll_s = os.getppid(), poll_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.poll_s):
            if os.getppid() != self.parent:
                log.error("worker process %s died; the job is abandoned", self.parent)
                os._exit(70)

    def stop(self) -> None:
        self._stop_event.set()


def run_job(kind: str, params: dict, task: str | None = None) -> dict:
    """The RQ job function: JSON params in, the task's JSON result out.

    `task` (`module:function`) defaults to the kind's entry in TASKS. Model names only:
    TaskContext.allow_paths stays False for every job.
    """
    from rq import get_current_job

    from app.tasks import TaskContext
    from resa_engine.progress import Cancelled

    job = get_current_job()
    if job is None:
        raise RuntimeError("run_job must run inside an RQ worker")
    settings = get_settings()
    configure_logging(settings.log_json, settings.log_level)  # a fresh process: its lines carry the job id
    token = job_id_var.set(job.id)
    previous = _catch_stop_signal()
    watch = WorkerWatch()
    watch.start()
    job.meta["process"] = {"pid": os.getpid(), "host": socket.gethostname()}
    _save_meta_quietly(job)
    stop = CancelFlag(job.connection, job.id)
    log.info("job %s (%s) started", job.id, kind, extra={"kind": kind, "pid": os.getpid()})
    try:
        fn = _import(task or TASK_FUNCTIONS[kind])
        ctx = TaskContext.from_settings(settings, progress=MetaProgress(job), should_stop=stop, job_id=job.id)
        ctx.allow_paths = False
        result = fn(params, ctx)
        log.info("job %s (%s) finished", job.id, kind, extra={"kind": kind})
        # The result is stored with the JSON serializer: make sure it is plain JSON now.
        return json.loads(json.dumps(result if result is not None else {}, default=str))
    except Cancelled as exc:
        if stop.shutdown() and not stop.requested_now():
            return _requeue_after_shutdown(job, exc)
        job.meta["canceled"] = {"reason": stop.reason(), "detail": str(exc), "at": iso(now_utc())}
        _save_meta_quietly(job)
        log.info("job %s (%s) canceled: %s", job.id, kind, job.meta["canceled"]["reason"], extra={"kind": kind})
        raise
    except BaseException as exc:
        if stop.requested():
            job.meta["canceled"] = {"reason": stop.reason(), "detail": str(exc), "at": iso(now_utc())}
        else:
            job.meta["error"] = _error_from_exception(exc)
        _save_meta_quietly(job)
        log.warning("job %s (%s) failed: %s", job.id, kind, exc, extra={"kind": kind})
        raise
    finally:
        watch.stop()
        if previous is not None:
            signal.signal(JOB_STOP_SIGNAL, previous)
        job_id_var.reset(token)


def _catch_stop_signal():
    """Make JOB_STOP_SIGNAL set the shutdown flag (the worker starts horses with it ignored, so one
    sent before this point is lost; the worker repeats it). Returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(JOB_STOP_SIGNAL, _on_stop_signal)


class JobInterrupted(RuntimeError):
    """The job was stopped by worker shutdowns more often than MAX_SHUTDOWN_REQUEUES."""


def _requeue_after_shutdown(job: Job, exc: BaseException) -> JobRetry:
    """The task stopped at a step boundary and saved its checkpoint because its worker is shutting
    down: put the job back at the front of the queue (RQ's Retry result), so the next worker
    resumes it; dependents keep waiting. After MAX_SHUTDOWN_REQUEUES interruptions it fails instead."""
    count = int((job.meta.get("interrupted") or {}).get("count", 0)) + 1
    job.meta["interrupted"] = {"reason": SHUTDOWN_REASON, "detail": str(exc), "at": iso(now_utc()), "count": count}
    if count > MAX_SHUTDOWN_REQUEUES:
        job.meta["error"] = {"type": "worker_shutdown", "message": f"{SHUTDOWN_REASON} (interrupted {count} times; submit it again)"}
        _save_meta_quietly(job)
        raise JobInterrupted(job.meta["error"]["message"]) from exc
    _save_meta_quietly(job)
    log.warning("job %s: %s; back in the queue (%s)", job.id, SHUTDOWN_REASON, exc, extra={"interruptions": count})
    return JobRetry(max=MAX_SHUTDOWN_REQUEUES, enqueue_at_front=True)


def _save_meta_quietly(job: Job) -> None:
    try:
        job.save_meta()
    except redis.RedisError as exc:
        log.warning("job %s: cannot save meta: %s", job.id, exc)


def _error_from_exception(exc: BaseException) -> dict:
    from adapters_store import ArtifactConflict, ArtifactNotFound

    name = type(exc).__name__
    if name == "JobTimeoutException":
        return {"type": "timeout", "message": f"job exceeded its time limit ({exc})"}
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else name
    if isinstance(exc, ArtifactConflict):
        kind = "conflict"
    elif isinstance(exc, ArtifactNotFound):
        kind = "not_found"
    elif isinstance(exc, (ValueError, LookupError)):
        kind = "invalid_params"  # DatasetError, ModelError and the tasks' own checks
    else:
        kind = "task_error"
    return {"type": kind, "message": message, "exception": name}


def on_job_failure(job: Job, connection: redis.Redis, exc_type=None, exc_value=None, traceback=None) -> None:
    """RQ failure callback (also run for abandoned jobs): record why, cancel the dependents."""
    from rq.exceptions import AbandonedJobError

    meta = job.get_meta(refresh=True)
    if exc_type is AbandonedJobError and "error" not in meta and "canceled" not in meta:
        job.meta["error"] = {"type": "worker_died", "message": "worker died while running the job (no heartbeat)"}
        job.save_meta()
    view = job_view(job, refresh_status=False, status_override="failed", with_params=False)
    why = view["error"]["message"] if view["error"] else view["state"]
    cancel_dependents(connection, job, f"parent job {job.id} ({view['kind']}) {view['state']}: {why}")
