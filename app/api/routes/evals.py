"""Evaluations: pass@1 on verified QA of several arms (base, skill, source, controls, custom arms), each paired with
the base on the same questions (a job; the finished job holds the report, and it is kept beside the adapter)."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.api.deps import CatalogDep, EvalAccess, JobsDep, SettingsDep, StoreDep
from app.api.schemas import EvalAccepted, EvalCreate, error_responses
from app.api.submissions import submit_eval

router = APIRouter(tags=["evals"], responses=error_responses(401, 403, 422))


@router.post(
    "/evals",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=EvalAccepted,
    summary="Evaluate a model, with or without a skill (a job)",
    responses=error_responses(404, 409, 503),
)
def create_eval(body: EvalCreate, _: EvalAccess, store: StoreDep, jobs: JobsDep, catalog: CatalogDep, settings: SettingsDep) -> dict:
    return submit_eval(body, store=store, jobs=jobs, catalog=catalog, max_new_tokens=settings.max_new_tokens)
