"""Background jobs on Redis with RQ: enqueue and supervise (queue.py), job views (views.py), what runs
in a job's process (runner.py), the worker (worker.py).

One job API for every long task (source, extract, tune, eval):
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

from app.jobs.queue import JOB_FUNC, TASKS, JobNotFound, JobQueue, JobStateError, cancel_dependents, cancel_key, connect
from app.jobs.runner import CancelFlag, MetaProgress, on_job_failure, run_job
from app.jobs.views import STATES, TERMINAL, job_state, job_view
from app.jobs.worker import ResaWorker, Supervisor, run_worker

__all__ = [
    "JOB_FUNC", "STATES", "TASKS", "TERMINAL", "CancelFlag", "JobNotFound", "JobQueue", "JobStateError", "MetaProgress",
    "ResaWorker", "Supervisor", "cancel_dependents", "cancel_key", "connect", "job_state", "job_view", "on_job_failure",
    "run_job", "run_worker",
]  # fmt: skip
