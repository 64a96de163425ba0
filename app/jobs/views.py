"""What GET /jobs answers: a job's state, progress, result or error, from RQ's record and its meta."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from rq.job import Job, JobStatus

from resa_engine.provenance import finite

STATES = ("queued", "started", "finished", "failed", "canceled")
TERMINAL = frozenset({"finished", "failed", "canceled"})


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat(timespec="seconds")


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
    progress.update(finite(meta.get("progress") or {}))
    progress["metrics"] = {k: v for k, v in (progress.get("metrics") or {}).items() if v is not None}
    view: dict[str, Any] = {
        "id": job.id,
        "kind": meta.get("kind", "unknown"),
        "state": state,
        "status": str(status.value if isinstance(status, JobStatus) else status),
        "progress": progress,
        "result": None,
        "error": None,
        "created_at": iso(job.created_at),
        "enqueued_at": iso(job.enqueued_at),
        "started_at": iso(job.started_at),
        "ended_at": iso(job.ended_at),
        "depends_on": list(job._dependency_ids or []),
        "skill": meta.get("skill"),
        "target": meta.get("target"),
        "worker": job.worker_name,
        "cancel_requested": False,
    }
    if with_params:
        try:
            view["params"] = finite(job.args[1]) if len(job.args) > 1 else None
        except Exception:  # an unreadable payload must not break the listing
            view["params"] = None
    if state == "finished" and with_result:
        try:
            view["result"] = finite(job.return_value())
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
