"""Background jobs on Redis with RQ: enqueue, job views, cancellation, dependents, the worker.

One job API for every long task (extract, tune, eval):
- jobs are RQ jobs with the JSON serializer (never pickle); the job function is `run_job`,
  a module-level function of JSON params that builds a TaskContext and calls the task;
- workers are `SpawnWorker`s: each job runs in a freshly spawned process (CUDA is not
  fork-safe), with an explicit timeout, result TTL and failure TTL;
- progress goes to `job.meta["progress"]`; cancellation is a Redis flag the task polls
  through `should_stop`, so a running job stops at its next step and ends canceled;
- a job that depends on another (extract -> tune) waits in RQ's deferred registry and is
  cancelled, with the reason, when its parent fails or is cancelled;
- a job whose worker dies is noticed by the worker's missing heartbeats and failed through
  RQ's abandoned-job handling ("worker died"); checkpoints live in deterministic staging
  folders, so the same request submitted again resumes instead of starting over;
- a worker told to stop (SIGTERM/SIGINT) asks its running job to stop through the same
  `should_stop` path: the task saves its checkpoint and the job goes back to the front of
  the queue ("worker shut down; resumable from checkpoint"); a job that does not stop
  within the drain timeout is killed and failed with that reason. Heartbeats ride out a
  Redis restart.

Nothing here imports torch: the API enqueues without it, the task imports it in the worker.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.callbacks import Callback
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.job import Retry as JobRetry
from rq.registry import DeferredJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import SpawnWorker

from app.logging import configure_logging, job_id_var
from app.settings import Settings, get_settings

log = logging.getLogger("resa.jobs")

TASKS = {
    "extract": "app.tasks.extract:run_extract",
    "tune": "app.tasks.tune:run_tune",
    "eval": "app.tasks.evaluate:run_eval",
}
"""Job kind -> the task function (`module:function`) a worker runs for it."""

STATES = ("queued", "started", "finished", "failed", "canceled")
TERMINAL = frozenset({"finished", "failed", "canceled"})

JOB_FUNC = "app.jobs.run_job"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
INDEX_KEY = "resa:jobs"  # zset of job ids scored by submission time: the listing index
BUILDING_KEY = "resa:building"  # hash "skill/<name>" | "adapter/<target>/<skill>" -> job id
HEARTBEAT_S = 2
"""How often a worker heartbeats the job it runs (RQ's job monitoring interval)."""
ABANDONED_AFTER_S = 12
"""A started job whose worker heartbeat is this old is abandoned: its worker died."""
CANCEL_GRACE_S = 30
"""A running job that ignores its cancel flag this long is stopped by killing its process."""
STOP_POLL_S = 0.5
JOB_STOP_SIGNAL = signal.SIGUSR1
"""What a worker sends its work horse to make the running task stop at its next step (shutdown)."""
SHUTDOWN_REASON = "worker shut down; resumable from checkpoint"
MAX_SHUTDOWN_REQUEUES = 5
"""A job interrupted by this many worker shutdowns in a row fails (with SHUTDOWN_REASON) instead of going back to the queue."""
PROGRESS_MIN_INTERVAL_S = 0.5


class JobNotFound(LookupError):
    """No job with that id (never existed, or its TTL expired)."""


class JobStateError(RuntimeError):
    """The job is in a state where the operation makes no sense (e.g. cancelling a finished job)."""


def cancel_key(job_id: str) -> str:
    return f"resa:cancel:{job_id}"


def connect(url: str, *, timeout_s: float = 2.0) -> redis.Redis:
    """A Redis client that fails fast (one quick retry) so a dead Redis answers 503, not a hang."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=timeout_s, socket_timeout=max(timeout_s, 5.0), retry=Retry(NoBackoff(), 1)
    )


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat(timespec="seconds")


def _import(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------- the job function (runs in the work horse)


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
        fn = _import(task or TASKS[kind])
        ctx = TaskContext.from_settings(settings, progress=MetaProgress(job), should_stop=stop, job_id=job.id)
        ctx.allow_paths = False
        result = fn(params, ctx)
        log.info("job %s (%s) finished", job.id, kind, extra={"kind": kind})
        # The result is stored with the JSON serializer: make sure it is plain JSON now.
        return json.loads(json.dumps(result if result is not None else {}, default=str))
    except Cancelled as exc:
        if stop.shutdown() and not stop.requested_now():
            return _requeue_after_shutdown(job, exc)
        job.meta["canceled"] = {"reason": stop.reason(), "detail": str(exc), "at": _iso(_now())}
        _save_meta_quietly(job)
        log.info("job %s (%s) canceled: %s", job.id, kind, job.meta["canceled"]["reason"], extra={"kind": kind})
        raise
    except BaseException as exc:
        if stop.requested():
            job.meta["canceled"] = {"reason": stop.reason(), "detail": str(exc), "at": _iso(_now())}
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
    job.meta["interrupted"] = {"reason": SHUTDOWN_REASON, "detail": str(exc), "at": _iso(_now()), "count": count}
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


# ---------------------------------------------------------------- views


def _parse_exc_string(text: str | None) -> dict:
    text = (text or "").strip()
    if "Work-horse terminated unexpectedly" in text:
        sig = text.split("(signal", 1)[1].split(")")[0].strip() if "(signal" in text else None
        detail = f" (signal {sig})" if sig else ""
        return {"type": "worker_died", "message": f"worker died: the job's process terminated unexpectedly{detail}"}
    if "AbandonedJobError" in text:
        return {"type": "worker_died", "message": "worker died while running the job (no heartbeat)"}
    if "JobTimeoutException" in text:
        return {"type": "timeout", "message": "job exceeded its time limit"}
    if "stopped by user" in text:
        return {"type": "canceled", "message": "job stopped"}
    lines = [line for line in text.splitlines() if line.strip()]
    return {"type": "task_error", "message": lines[-1].strip() if lines else "job failed"}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: such floats (a diverged metric) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def job_state(status: JobStatus | str | None, meta: dict) -> str:
    status = JobStatus(status) if status else None
    if status in (JobStatus.CANCELED, JobStatus.STOPPED):
        return "canceled"
    if status == JobStatus.FAILED:
        return "canceled" if "canceled" in meta else "failed"
    if status == JobStatus.FINISHED:
        return "finished"
    if status == JobStatus.STARTED:
        return "started"
    return "queued"  # queued, deferred, scheduled, created, ready


def job_view(
    job: Job, *, refresh_status: bool = True, status_override: str | None = None, with_params: bool = True, with_result: bool = True
) -> dict:
    """What GET /jobs/{id} answers (listings leave out params and result)."""
    status = status_override or job.get_status(refresh=refresh_status)
    meta = job.meta or {}
    state = job_state(status, meta)
    progress = {"stage": None, "step": 0, "total": None, "eta_s": None, "metrics": {}}
    progress.update(_finite(meta.get("progress") or {}))
    progress["metrics"] = {k: v for k, v in (progress.get("metrics") or {}).items() if v is not None}
    view: dict[str, Any] = {
        "id": job.id,
        "kind": meta.get("kind", "unknown"),
        "state": state,
        "status": str(status.value if isinstance(status, JobStatus) else status),
        "progress": progress,
        "result": None,
        "error": None,
        "created_at": _iso(job.created_at),
        "enqueued_at": _iso(job.enqueued_at),
        "started_at": _iso(job.started_at),
        "ended_at": _iso(job.ended_at),
        "depends_on": list(job._dependency_ids or []),
        "skill": meta.get("skill"),
        "target": meta.get("target"),
        "worker": job.worker_name,
        "cancel_requested": False,
    }
    if with_params:
        try:
            view["params"] = _finite(job.args[1]) if len(job.args) > 1 else None
        except Exception:  # an unreadable payload must not break the listing
            view["params"] = None
    if state == "finished" and with_result:
        try:
            view["result"] = _finite(job.return_value())
        except Exception as exc:  # noqa: BLE001 - a result that cannot be decoded is reported, not raised
            view["error"] = {"type": "result_unreadable", "message": str(exc)}
    elif state == "canceled":
        info = meta.get("canceled") or {}
        view["error"] = {"type": "canceled", "message": info.get("reason") or "canceled"}
    elif state == "failed":
        if meta.get("error"):
            view["error"] = dict(meta["error"])
        else:
            try:
                latest = job.latest_result()
                view["error"] = _parse_exc_string(latest.exc_string if latest else None)
            except Exception:  # noqa: BLE001
                view["error"] = {"type": "task_error", "message": "job failed"}
    return view


# ---------------------------------------------------------------- the queue as the API sees it


@dataclass
class Submitted:
    job: Job
    view: dict


class JobQueue:
    """Enqueue, inspect and cancel jobs; the API's only door to Redis."""

    def __init__(self, connection: redis.Redis, settings: Settings | None = None):
        self.connection = connection
        self.settings = settings or get_settings()
        self.queue_name = self.settings.queue_names[0] if self.settings.queue_names else "resa"
        self.queue = Queue(self.queue_name, connection=connection, serializer=JSONSerializer)

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None) -> "JobQueue":
        return cls(connect(url), settings)

    # ------------------------------------------------------------ submit

    def enqueue(
        self,
        kind: str,
        params: dict,
        *,
        depends_on: Iterable[str] | str | None = None,
        task: str | None = None,
        claim: str | None = None,
        meta: dict | None = None,
        timeout_s: int | None = None,
    ) -> Job:
        """Queue `kind` with JSON params; `claim` ("skill/<name>", ...) refuses a second in-flight build."""
        if task is None and kind not in TASKS:
            raise ValueError(f"unknown job kind {kind!r} (known: {', '.join(TASKS)})")
        json.dumps(params)  # JSON or nothing: fail here, not in the worker
        parents = [depends_on] if isinstance(depends_on, str) else list(depends_on or [])
        s = self.settings
        failure_ttl = int(getattr(s, "failure_ttl_s", None) or s.result_ttl_s)
        job = self.queue.create_job(
            JOB_FUNC,
            args=[kind, params, task],
            timeout=int(timeout_s or s.job_timeout_s),
            result_ttl=int(s.result_ttl_s),
            failure_ttl=failure_ttl,
            ttl=None,
            description=f"{kind} {params.get('name') or params.get('skill') or params.get('model') or ''}".strip(),
            depends_on=parents or None,
            meta={"kind": kind, **(meta or {})},
            on_failure=Callback("app.jobs.on_job_failure"),
        )
        if claim is not None:
            self._claim(claim, job.id)
        try:
            job = self.queue.enqueue_job(job)
        except BaseException:
            if claim is not None:
                self.connection.hdel(BUILDING_KEY, claim)
            raise
        self.connection.zadd(INDEX_KEY, {job.id: time.time()})
        return job

    def _claim(self, claim: str, job_id: str) -> None:
        """Atomically record `job_id` as the builder of `claim` unless a live job already is."""
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(BUILDING_KEY)
                    current = pipe.hget(BUILDING_KEY, claim)
                    if current is not None and self._is_live(current.decode()):
                        raise JobStateError(f"{claim} is already being built by job {current.decode()}")
                    pipe.multi()
                    pipe.hset(BUILDING_KEY, claim, job_id)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def _is_live(self, job_id: str) -> bool:
        try:
            job = Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            return False
        return job_state(job.get_status(), job.meta or {}) not in TERMINAL

    def builder(self, claim: str) -> str | None:
        """The id of the live job building `claim`, if any."""
        current = self.connection.hget(BUILDING_KEY, claim)
        if current is not None and self._is_live(current.decode()):
            return current.decode()
        return None

    def builders(self, prefix: str) -> dict[str, str]:
        """Live builders whose claim starts with `prefix`."""
        out = {}
        for claim, job_id in self.connection.hgetall(BUILDING_KEY).items():
            claim, job_id = claim.decode(), job_id.decode()
            if claim.startswith(prefix) and self._is_live(job_id):
                out[claim] = job_id
        return out

    # ------------------------------------------------------------ read

    def fetch(self, job_id: str) -> Job:
        if not JOB_ID_RE.match(job_id or ""):  # RQ accepts ASCII only ("¾" is alphanumeric to str.isalnum)
            raise JobNotFound(f"job {job_id!r} not found")
        try:
            return Job.fetch(job_id, connection=self.connection, serializer=JSONSerializer)
        except NoSuchJobError:
            raise JobNotFound(f"job {job_id!r} not found") from None

    def view(self, job_id: str) -> dict:
        job = self.fetch(job_id)
        view = job_view(job)
        if view["state"] == "started" and self._reap_one(job):
            view = job_view(self.fetch(job_id))
        elif view["state"] == "queued" and view["status"] == "deferred":
            if self._cancel_orphan(job):
                view = job_view(self.fetch(job_id))
        view["cancel_requested"] = view["state"] not in TERMINAL and bool(self.connection.exists(cancel_key(job_id)))
        view["dependents"] = [d.decode() if isinstance(d, bytes) else d for d in self.connection.smembers(job.dependents_key)]
        return view

    def list(self, *, state: str | None = None, kind: str | None = None, limit: int = 100) -> list[dict]:
        """Newest first, without params and results (GET /jobs/{id} has them); jobs whose TTL
        expired drop out of the index here."""
        ids = [i.decode() for i in self.connection.zrevrange(INDEX_KEY, 0, -1)]
        jobs = Job.fetch_many(ids, connection=self.connection, serializer=JSONSerializer)
        gone = [i for i, j in zip(ids, jobs, strict=True) if j is None]
        if gone:
            self.connection.zrem(INDEX_KEY, *gone)
        out = []
        for job in jobs:
            if job is None:
                continue
            view = job_view(job, with_params=False, with_result=False)
            if (state and view["state"] != state) or (kind and view["kind"] != kind):
                continue
            out.append(view)
            if len(out) >= limit:
                break
        return out

    def counts(self) -> dict[str, int]:
        """Jobs by state (for /metrics), from each job's status and meta in one round trip."""
        ids = [i.decode() for i in self.connection.zrange(INDEX_KEY, 0, -1)]
        with self.connection.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(Job.key_for(job_id), "status", "meta")
            rows = pipe.execute()
        counts = dict.fromkeys(STATES, 0)
        for status, raw_meta in rows:
            if status is None:
                continue  # expired; the listing drops it from the index
            try:
                meta = JSONSerializer.loads(raw_meta) if raw_meta else {}
            except ValueError:
                meta = {}
            counts[job_state(status.decode(), meta)] += 1
        return counts

    def depth(self) -> int:
        return self.queue.count

    # ------------------------------------------------------------ cancel

    def cancel(self, job_id: str, reason: str = "canceled by request") -> dict:
        """Queued -> canceled now; running -> flag set, the task stops at its next step."""
        job = self.fetch(job_id)
        view = job_view(job)
        if view["state"] in TERMINAL:
            raise JobStateError(f"job {job_id} is already {view['state']}")
        # The flag first: if a worker picks the job up right now, it stops at its first step.
        self.connection.set(
            cancel_key(job_id), json.dumps({"reason": reason, "at": time.time()}), ex=int(self.settings.job_timeout_s) + 3600
        )
        if view["state"] == "queued":
            self._cancel_waiting(job, reason)
            cancel_dependents(self.connection, job, f"parent job {job_id} ({view['kind']}) canceled: {reason}")
        return self.view(job_id)

    def _cancel_waiting(self, job: Job, reason: str) -> None:
        job.meta["canceled"] = {"reason": reason, "at": _iso(_now())}
        job.save_meta()
        try:
            job.cancel()
        except InvalidJobOperation:
            pass

    # ------------------------------------------------------------ supervision

    def reap(self, queue_names: Iterable[str] | None = None) -> dict[str, int]:
        """One supervision pass over the queues (default: all configured): fail jobs whose worker
        died, stop jobs that ignore a cancel, cancel deferred jobs whose parent will never finish.
        Safe to run from many processes at once."""
        done = {"abandoned": 0, "stopped": 0, "orphans": 0}
        for name in queue_names or self.settings.queue_names or [self.queue_name]:
            started = StartedJobRegistry(name, connection=self.connection, serializer=JSONSerializer)
            for job_id, _execution in started.get_job_and_execution_ids(cleanup=False):
                try:
                    job = self.fetch(job_id)
                except JobNotFound:
                    continue
                if job.get_status() == JobStatus.STARTED:
                    if self._reap_one(job):
                        done["abandoned"] += 1
                    elif self._stop_ignored_cancel(job):
                        done["stopped"] += 1
            deferred = DeferredJobRegistry(name, connection=self.connection, serializer=JSONSerializer)
            for job_id in deferred.get_job_ids(cleanup=False):
                try:
                    if self._cancel_orphan(self.fetch(job_id)):
                        done["orphans"] += 1
                except JobNotFound:
                    continue
        return done

    def _reap_one(self, job: Job) -> bool:
        """Fail a started job whose worker stopped heartbeating it, through RQ's abandoned-job path.

        The worker's main process (never busy: it only waits on its work horse) refreshes the
        job's `last_heartbeat` every HEARTBEAT_S; a stale one means the worker is gone.
        """
        job.refresh()
        beat = job.last_heartbeat or job.started_at
        if beat is None or job.get_status() != JobStatus.STARTED:
            return False
        silent_s = (_now() - beat.replace(tzinfo=timezone.utc)).total_seconds()
        if silent_s < ABANDONED_AFTER_S:
            return False
        log.warning("job %s: no heartbeat from worker %s for %.0f s, it died", job.id, job.worker_name, silent_s)
        job.meta["error"] = {
            "type": "worker_died",
            "message": f"worker died while running the job (no heartbeat for {silent_s:.0f} s)",
            "worker": job.worker_name,
        }
        job.save_meta()
        registry = StartedJobRegistry(
            job.origin, connection=self.connection, serializer=JSONSerializer, death_penalty_class=TimerDeathPenalty
        )
        # Expire its execution entries now, then let RQ's cleanup do the rest: FAILED status,
        # FailedJobRegistry, failure result, failure callback (which cancels dependents).
        for jid, execution_id in registry.get_job_and_execution_ids(cleanup=False):
            if jid == job.id:
                self.connection.zadd(registry.key, {f"{jid}:{execution_id}": 0})
        registry.cleanup(timestamp=1)  # only the entries zeroed above
        if job.get_status() == JobStatus.STARTED:  # no execution entry (already cleaned): fail it directly
            from rq.job_lifecycle import record_job_failure

            with self.connection.pipeline() as pipe:
                record_job_failure(job, "AbandonedJobError: worker died", pipe)
                pipe.execute()
        cancel_dependents(self.connection, job, f"parent job {job.id} failed: worker died")
        return True

    def _stop_ignored_cancel(self, job: Job) -> bool:
        raw = self.connection.get(cancel_key(job.id))
        if not raw:
            return False
        try:
            asked_at = float(json.loads(raw)["at"])
        except (ValueError, KeyError, TypeError):
            return False
        if time.time() - asked_at < CANCEL_GRACE_S:
            return False
        try:
            send_stop_job_command(self.connection, job.id, serializer=JSONSerializer)
        except InvalidJobOperation:
            return False
        return True

    def _cancel_orphan(self, job: Job) -> bool:
        """A deferred job whose parent failed or was cancelled will never run: cancel it, saying why."""
        for parent_id in job._dependency_ids or []:
            try:
                parent = self.fetch(parent_id)
            except JobNotFound:
                reason = f"parent job {parent_id} no longer exists"
            else:
                pview = job_view(parent, with_params=False)
                if pview["state"] not in ("failed", "canceled"):
                    continue
                message = pview["error"]["message"] if pview["error"] else pview["state"]
                reason = f"parent job {parent_id} ({pview['kind']}) {pview['state']}: {message}"
            self._cancel_waiting(job, reason)
            cancel_dependents(self.connection, job, f"parent job {job.id} canceled: {reason}")
            return True
        return False


def cancel_dependents(connection: redis.Redis, job: Job, reason: str) -> list[str]:
    """Cancel every not-yet-started job waiting on `job` (and theirs), recording `reason`."""
    canceled = []
    pending = [job]
    while pending:
        parent = pending.pop()
        for raw in connection.smembers(parent.dependents_key):
            dep_id = raw.decode() if isinstance(raw, bytes) else raw
            try:
                dep = Job.fetch(dep_id, connection=connection, serializer=JSONSerializer)
            except NoSuchJobError:
                continue
            if job_state(dep.get_status(), dep.meta or {}) != "queued":
                continue
            dep.meta["canceled"] = {"reason": reason, "at": _iso(_now())}
            dep.save_meta()
            try:
                dep.cancel()
            except InvalidJobOperation:
                continue
            canceled.append(dep_id)
            pending.append(dep)
    return canceled


# ---------------------------------------------------------------- the worker


class ResaWorker(SpawnWorker):
    """A SpawnWorker whose shutdown checkpoints the running job instead of waiting for it to end.

    First SIGTERM/SIGINT (RQ's warm shutdown): the work horse gets JOB_STOP_SIGNAL (repeated
    at every heartbeat), its task stops at its next step after saving its checkpoint, and
    run_job puts the job back in the queue. A job still running `drain_timeout_s` later is
    killed and failed with the reason; a second signal does that at the next heartbeat.
    Heartbeats that fail because Redis is down are skipped, not fatal: the job keeps running
    and is heartbeated again once Redis is back.
    """

    def __init__(self, *args, drain_timeout_s: float = 20.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.drain_timeout_s = drain_timeout_s
        self._drain_deadline: float | None = None
        self._stop_signals = 0

    def execute_job(self, job: Job, queue: Queue):
        token = job_id_var.set(job.id)
        try:
            return super().execute_job(job, queue)
        finally:
            job_id_var.reset(token)

    def main_work_horse(self, job: Job, queue: Queue):
        """The job process: its log lines, RQ's included, are the service's and carry the job id."""
        settings = get_settings()
        configure_logging(settings.log_json, settings.log_level)
        job_id_var.set(job.id)
        return super().main_work_horse(job, queue)

    def handle_warm_shutdown_request(self) -> None:
        super().handle_warm_shutdown_request()
        self._stop_signals += 1
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.drain_timeout_s
        if self.horse_pid:
            log.info("worker shutting down: asking the running job to checkpoint and stop (drain timeout %g s)", self.drain_timeout_s)
            self._signal_horse()

    def request_force_stop(self, signum, frame) -> None:
        """Second signal: kill the running job at the next heartbeat (failed, with the reason); a third one exits now."""
        if self._shutdown_requested_date and (now() - self._shutdown_requested_date).total_seconds() < 1:
            return  # one keypress can arrive twice (terminal and process group)
        self._stop_signals += 1
        if self.horse_pid and self._stop_signals == 2:
            log.warning("second stop signal: the running job is killed at the next heartbeat")
            self._drain_deadline = time.monotonic()
            return
        super().request_force_stop(signum, frame)

    def maintain_heartbeats(self, job: Job, execution) -> None:
        if self._drain_deadline is not None and self.horse_pid:
            if time.monotonic() >= self._drain_deadline:
                self._kill_for_shutdown(job)
            else:
                self._signal_horse()  # again: a horse still starting up had the signal ignored
        try:
            super().maintain_heartbeats(job, execution)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("cannot heartbeat job %s, Redis unreachable (%s); the job goes on", job.id, exc)

    def set_shutdown_requested_date(self) -> None:
        try:  # bookkeeping only: a shutdown must not fail because Redis is down
            super().set_shutdown_requested_date()
        except redis.RedisError as exc:
            log.warning("cannot record the shutdown request in Redis: %s", exc)

    def _signal_horse(self) -> None:
        try:
            os.kill(self.horse_pid, JOB_STOP_SIGNAL)
        except ProcessLookupError:
            pass

    def _kill_for_shutdown(self, job: Job) -> None:
        message = (
            f"{SHUTDOWN_REASON}: the job did not stop within the drain timeout ({self.drain_timeout_s:g} s) "
            "and was killed; submit it again to resume from its last checkpoint"
        )
        log.warning("job %s: %s", job.id, message)
        try:
            job.get_meta(refresh=True)
            job.meta["error"] = {"type": "worker_shutdown", "message": message, "worker": self.name}
            job.save_meta()
        except redis.RedisError as exc:
            log.warning("job %s: cannot record why it was killed: %s", job.id, exc)
        self.kill_horse()  # SIGKILL; RQ then fails the job ("work-horse terminated") and the meta says why
        self._drain_deadline = float("inf")


def run_worker(
    settings: Settings | None = None,
    *,
    queues: list[str] | None = None,
    burst: bool = False,
    name: str | None = None,
    exit_with_parent: bool = False,
    job_monitoring_interval: int = HEARTBEAT_S,
) -> bool:
    """Run a ResaWorker (one fresh process per job) until stopped; True if it ran any job."""
    settings = settings or get_settings()
    if not settings.redis_url:
        raise ValueError("RESA_REDIS_URL is required for a worker (resa serve starts its own when unset)")
    connection = redis.Redis.from_url(settings.redis_url)
    connection.ping()
    worker = ResaWorker(
        queues or settings.queue_names,
        connection=connection,
        name=name,
        serializer=JSONSerializer,
        default_result_ttl=int(settings.result_ttl_s),
        job_monitoring_interval=job_monitoring_interval,
        drain_timeout_s=float(settings.drain_timeout_s),
    )
    if exit_with_parent:
        _exit_with_parent()
    # Horses inherit an ignored JOB_STOP_SIGNAL until run_job catches it: a stop request that
    # arrives while a horse starts up is lost (and repeated), never fatal.
    signal.signal(JOB_STOP_SIGNAL, signal.SIG_IGN)
    # Supervision also runs here, so a deployment of workers without an API still fails
    # dead jobs and releases the dependents of failed ones.
    supervisor = Supervisor(JobQueue(connection, settings), queue_names=worker.queue_names())
    supervisor.start()
    try:
        return worker.work(burst=burst, logging_level=settings.log_level.upper())
    finally:
        supervisor.stop()


class Supervisor(threading.Thread):
    """Runs JobQueue.reap() every few seconds in the background."""

    def __init__(self, jobs: JobQueue, queue_names: list[str] | None = None, interval_s: float = 3.0):
        super().__init__(name="resa-supervisor", daemon=True)
        self.jobs, self.queue_names, self.interval_s = jobs, queue_names, interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.jobs.reap(self.queue_names)
            except redis.RedisError as exc:
                log.debug("supervision pass skipped: %s", exc)
            except Exception:  # noqa: BLE001 - supervision must outlive one bad job record
                log.exception("supervision pass failed")

    def stop(self) -> None:
        self._stop_event.set()


def _exit_with_parent() -> None:
    """End this worker when the process that started it (`resa serve`) is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                log.error("parent process %s is gone; worker exits", parent)
                os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
