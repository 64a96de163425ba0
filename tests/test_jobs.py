"""The job layer with a real Redis and a real `resa worker` (SpawnWorker): progress, results,
dependents, cancellation, resume, timeouts, and workers that die mid-job.

Jobs here run a small real task (tests/_helpers_jobs.py:run_sleep) through the same
job machinery as extraction; they are enqueued with JobQueue and observed and
cancelled over HTTP.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from _helpers_jobs import SLEEP_TASK, wait_for
from _helpers_service import start_service
from app.tasks import staging_for


@pytest.fixture(scope="module")
def svc(tmp_path_factory, models_file, session_cache_dir, redis_server):
    yield from start_service(
        tmp_path_factory.mktemp("jobs"), models_file, session_cache_dir, redis_server.url, RESA_DEFAULT_MODEL=""
    )


def sleep_job(svc, name, *, steps=5, delay_s=0.1, depends_on=None, kind="extract", **params):
    job = svc.jobs().enqueue(
        kind, {"name": name, "steps": steps, "delay_s": delay_s, **params}, task=SLEEP_TASK, depends_on=depends_on, meta={"skill": name}
    )
    return job.id


def started_with_progress(svc, job_id):
    def check():
        view = svc.client.get(f"/jobs/{job_id}").json()
        return view if view["state"] == "started" and view["progress"]["step"] > 0 else None

    return wait_for(check, 60, 0.1, f"job {job_id} to report progress")


def test_job_reports_progress_then_result_and_is_listed(svc):
    job_id = sleep_job(svc, "prog", steps=8, delay_s=0.25)
    running = started_with_progress(svc, job_id)
    p = running["progress"]
    assert p["stage"] == "sleep" and p["total"] == 8 and 0 < p["step"] <= 8
    assert set(p) >= {"step", "total", "eta_s", "metrics", "stage"} and "loss" in p["metrics"]

    with svc.client.stream("GET", f"/jobs/{job_id}/events") as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in events.iter_lines() if line.startswith(("event:", "data:"))]
    kinds = [line.split(":", 1)[1].strip() for line in lines if line.startswith("event:")]
    assert kinds[-1] == "end" and set(kinds[:-1]) <= {"progress"}
    final = json.loads(lines[-1].split(":", 1)[1])
    assert final["state"] == "finished" and final["progress"]["step"] == 8

    view = svc.client.get(f"/jobs/{job_id}").json()
    assert view["result"]["skill"] == "prog" and view["result"]["resumed_from"] == 0
    assert view["result"]["allow_paths"] is False and view["result"]["job_id"] == job_id
    assert view["started_at"] and view["ended_at"] and view["error"] is None
    assert svc.client.get("/skills/prog").status_code == 200
    listed = svc.client.get("/jobs", params={"state": "finished", "kind": "extract"}).json()["jobs"]
    assert job_id in [j["id"] for j in listed]
    assert job_id not in [j["id"] for j in svc.client.get("/jobs", params={"state": "failed"}).json()["jobs"]]
    assert svc.client.delete(f"/jobs/{job_id}").status_code == 409  # already finished


def test_failed_parent_cancels_its_dependents_with_the_reason(svc):
    parent = sleep_job(svc, "bad-parent", steps=2, fail=True)
    child = sleep_job(svc, "child", depends_on=parent, kind="tune")
    grandchild = sleep_job(svc, "grandchild", depends_on=child, kind="tune")
    assert svc.client.get(f"/jobs/{child}").json()["status"] == "deferred"
    failed = svc.wait_job(parent)
    assert failed["state"] == "failed"
    assert failed["error"]["type"] == "invalid_params" and "failed on purpose" in failed["error"]["message"]
    for dep in (child, grandchild):
        view = svc.wait_job(dep)
        assert view["state"] == "canceled", view
        assert "parent job" in view["error"]["message"]
    assert parent in svc.client.get(f"/jobs/{child}").json()["error"]["message"]
    assert "failed on purpose" in svc.client.get(f"/jobs/{child}").json()["error"]["message"]
    assert svc.client.get("/skills/child").status_code == 404


def test_cancel_queued_and_running_jobs_then_resume_from_checkpoint(svc):
    parent = sleep_job(svc, "long", steps=60, delay_s=0.1)
    child = sleep_job(svc, "after-long", depends_on=parent, kind="tune")
    started_with_progress(svc, parent)

    res = svc.client.delete(f"/jobs/{child}")
    assert res.status_code == 200 and res.json()["state"] == "canceled"
    assert res.json()["error"]["message"] == "canceled by request"

    res = svc.client.delete(f"/jobs/{parent}")
    assert res.status_code == 202 and res.json()["cancel_requested"] is True
    view = svc.wait_job(parent)
    assert view["state"] == "canceled" and view["error"]["type"] == "canceled"
    assert 0 < view["progress"]["step"] < 60
    # nothing half-written is visible: the skill was never committed, its checkpoint stays in staging
    assert svc.client.get("/skills/long").status_code == 404
    ckpt = staging_for(svc.settings).path("skill", "long") / "checkpoint.json"
    stopped_at = json.loads(ckpt.read_text())["step"]
    assert stopped_at > 0
    assert svc.client.delete(f"/jobs/{parent}").status_code == 409
    assert svc.client.delete("/jobs/no-such-job").status_code == 404

    # the same request again resumes from the checkpoint of the canceled run (deterministic staging)
    again = sleep_job(svc, "long", steps=60, delay_s=0.01)
    done = svc.wait_job(again)
    assert done["state"] == "finished" and done["result"]["resumed_from"] == stopped_at
    assert svc.client.get("/skills/long").status_code == 200


def test_running_job_that_ignores_its_cancel_flag_is_stopped(svc, monkeypatch):
    import app.jobs.queue

    job_id = sleep_job(svc, "stubborn", steps=300, delay_s=0.1, ignore_stop=True)
    started_with_progress(svc, job_id)
    assert svc.client.delete(f"/jobs/{job_id}").status_code == 202
    monkeypatch.setattr(app.jobs.queue, "CANCEL_GRACE_S", 0)  # as if the grace period had passed
    assert svc.jobs().reap()["stopped"] == 1
    view = svc.wait_job(job_id)
    assert view["state"] == "canceled" and view["status"] == "stopped"
    assert svc.client.get("/skills/stubborn").status_code == 404


def test_job_over_its_time_limit_fails_with_the_reason(svc):
    job = svc.jobs().enqueue("extract", {"name": "slow", "steps": 40, "delay_s": 0.2}, task=SLEEP_TASK, timeout_s=2)
    view = svc.wait_job(job.id)
    assert view["state"] == "failed" and view["error"]["type"] == "timeout"
    assert svc.client.get("/skills/slow").status_code == 404


def _horse_pid(svc, job_id) -> int:
    """The work horse's pid, which run_job records in the job's meta."""
    return wait_for(lambda: (svc.jobs().fetch(job_id).get_meta().get("process") or {}).get("pid"), 30, 0.1, "the horse pid")


def test_killed_work_horse_is_reported_as_worker_died(svc):
    job_id = sleep_job(svc, "horse", steps=100, delay_s=0.1)
    started_with_progress(svc, job_id)
    os.kill(_horse_pid(svc, job_id), signal.SIGKILL)
    view = svc.wait_job(job_id)
    assert view["state"] == "failed" and view["error"]["type"] == "worker_died"
    assert "signal 9" in view["error"]["message"]
    assert svc.client.get("/skills/horse").status_code == 404


def test_worker_sigkilled_mid_job_is_detected_and_reported_failed(svc):
    job_id = sleep_job(svc, "doomed", steps=200, delay_s=0.1)
    child = sleep_job(svc, "after-doomed", depends_on=job_id, kind="tune")
    started_with_progress(svc, job_id)
    horse = _horse_pid(svc, job_id)
    svc.worker.kill()

    view = svc.wait_job(job_id, timeout_s=60)
    assert view["state"] == "failed", view
    assert view["error"]["type"] == "worker_died" and "worker died" in view["error"]["message"]
    # the orphaned work horse exited with its worker; nothing was committed
    wait_for(lambda: not _alive(horse), 10, 0.2, "the orphaned work horse to exit")
    assert svc.client.get("/skills/doomed").status_code == 404
    dep = svc.wait_job(child)
    assert dep["state"] == "canceled" and "worker died" in dep["error"]["message"]

    # a new worker takes over the queue; the same request resumes the dead job's checkpoint
    svc.start_worker()
    again = svc.wait_job(sleep_job(svc, "doomed", steps=200, delay_s=0.0))
    assert again["state"] == "finished" and again["result"]["resumed_from"] > 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it has exited all the same
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
