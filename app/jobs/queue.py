"""The job queue as the API sees it: enqueue (with claims on what a job builds), read, list, cancel,
and supervision (fail jobs whose worker died, stop jobs that ignore a cancel, cancel orphans)."""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Iterable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rq import Queue
from rq.callbacks import Callback
from rq.command import send_stop_job_command
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import DeferredJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import TimerDeathPenalty

from app.jobs.views import STATES, TERMINAL, iso, job_state, job_view, now_utc
from app.settings import Settings, get_settings

log = logging.getLogger("resa.jobs")

TASKS = ("source", "extract", "tune", "eval")
"""Job kinds; runner.TASK_FUNCTIONS names the function a worker runs for each."""
JOB_FUNC = "app.jobs.run_job"
"""The RQ job function, by the path stored in every job record (kept stable across releases)."""
ON_FAILURE = "app.jobs.on_job_failure"
JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,100}$")
INDEX_KEY = "resa:jobs"  # zset of job ids scored by submission time: the listing index
BUILDING_KEY = "resa:building"  # hash "skill/<name>" | "adapter/<target>/<skill>" -> job id
HEARTBEAT_S = 2
"""How often a worker heartbeats the job it runs (RQ's job monitoring interval)."""
ABANDONED_AFTER_S = 12
"""A started job whose worker heartbeat is this old is abandoned: its worker died."""
CANCEL_GRACE_S = 30
"""A running job that ignores its cancel flag this long is stopped by killing its process."""


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
            on_failure=Callback(ON_FAILURE),
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
        job.meta["canceled"] = {"reason": reason, "at": iso(now_utc())}
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
        silent_s = (now_utc() - beat.replace(tzinfo=timezone.utc)).total_seconds()
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
            dep.meta["canceled"] = {"reason": reason, "at": iso(now_utc())}
            dep.save_meta()
            try:
                dep.cancel()
            except InvalidJobOperation:
                continue
            canceled.append(dep_id)
            pending.append(dep)
    return canceled
