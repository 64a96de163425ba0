"""Sources: train the LoRA a skill is extracted from (GRPO as the paper's sources, or SFT), as a job."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.api.deps import AdminAccess, CatalogDep, JobsDep, StoreDep
from app.api.schemas import SourceAccepted, SourceCreate, error_responses
from app.api.submissions import submit_source

router = APIRouter(tags=["sources"], responses=error_responses(401, 403, 422))


@router.post(
    "/sources", status_code=status.HTTP_202_ACCEPTED, response_model=SourceAccepted, summary="Train a source LoRA (a job)",
    responses=error_responses(404, 409, 503),
)  # fmt: skip
def create_source(body: SourceCreate, _: AdminAccess, store: StoreDep, jobs: JobsDep, catalog: CatalogDep) -> dict:
    """Queues a job that trains a LoRA on `model` with `method` and commits it as adapter (`model`, `name`);
    extract a skill from it with `POST /skills` and `"source": {"model": model, "adapter": name}`."""
    return submit_source(body, store=store, jobs=jobs, catalog=catalog)
