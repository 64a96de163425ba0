"""The job worker: a SpawnWorker (one fresh process per job) whose shutdown checkpoints the running
job, plus the supervision thread that also runs in workers."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SpawnWorker

from app.jobs.queue import HEARTBEAT_S, JobQueue
from app.jobs.runner import JOB_STOP_SIGNAL, SHUTDOWN_REASON
from app.logging import configure_logging, job_id_var
from app.settings import Settings, get_settings

log = logging.getLogger("resa.jobs")


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
