"""Jobs: list, inspect, follow (SSE), cancel.

DELETE /jobs/{id}: a queued job is canceled at once (200); a running one gets its cancel
flag and stops at its next step (202, then `canceled`); a finished one is a 409.
Admin keys may cancel any job; generate keys their evaluations.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse

from app.api.deps import JobsDep, ReadAccess
from app.api.errors import Forbidden
from app.api.schemas import JobList, JobView, error_responses
from app.jobs import TERMINAL

router = APIRouter(tags=["jobs"], responses=error_responses(401, 403, 422, 503))
ERRORS = error_responses(404, 409, 503)
EVENT_POLL_S = 0.5
KEEPALIVE_S = 15.0


@router.get("/jobs", response_model=JobList, summary="Jobs, newest first", responses=error_responses(503))
def list_jobs(
    _: ReadAccess,
    jobs: JobsDep,
    state: Annotated[Literal["queued", "started", "finished", "failed", "canceled"] | None, Query()] = None,
    kind: Annotated[Literal["source", "extract", "tune", "eval"] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    return {"jobs": jobs.list(state=state, kind=kind, limit=limit)}


@router.get("/jobs/{job_id}", response_model=JobView, summary="One job: state, progress, result or error", responses=ERRORS)
def get_job(job_id: str, _: ReadAccess, jobs: JobsDep) -> dict:
    return jobs.view(job_id)


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@router.get(
    "/jobs/{job_id}/events",
    summary="Follow a job: Server-Sent Events until it ends",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "`progress` events, then one `end` event."}, **ERRORS},
)
async def job_events(job_id: str, request: Request, _: ReadAccess, jobs: JobsDep) -> StreamingResponse:
    first = await asyncio.to_thread(jobs.view, job_id)  # 404 before the stream starts

    async def events():
        view, last, last_sent = first, None, time.monotonic()
        while True:
            if view != last:
                terminal = view["state"] in TERMINAL
                yield _sse("end" if terminal else "progress", view)
                last, last_sent = view, time.monotonic()
                if terminal:
                    return
            elif time.monotonic() - last_sent > KEEPALIVE_S:
                yield b": keep-alive\n\n"
                last_sent = time.monotonic()
            await asyncio.sleep(EVENT_POLL_S)
            if await request.is_disconnected():
                return
            try:
                view = await asyncio.to_thread(jobs.view, job_id)
            except Exception as exc:  # noqa: BLE001 - Redis gone or the job expired: say so and end
                yield _sse("error", {"error": {"type": "unavailable", "message": str(exc)}})
                return

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.delete(
    "/jobs/{job_id}",
    response_model=JobView,
    summary="Cancel a job (queued: at once; running: at its next step)",
    responses={202: {"model": JobView, "description": "Cancel requested; the job stops at its next step."}, **ERRORS},
)
def cancel_job(job_id: str, principal: ReadAccess, jobs: JobsDep):
    """A queued job is canceled at once (200); a running one stops at its next step (202, then
    `canceled`); jobs waiting on it are canceled too. 409 if the job has already ended."""
    view = jobs.view(job_id)
    if not principal.can("admin") and not (view["kind"] == "eval" and principal.can("evals")):
        raise Forbidden(f"this API key (scope {principal.scope!r}) may cancel evaluations only")
    view = jobs.cancel(job_id)
    return JSONResponse(view, status_code=200 if view["state"] in TERMINAL else 202)
