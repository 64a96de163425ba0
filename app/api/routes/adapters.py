"""Adapters: build one for a target from a skill (a job), list, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from app.api.deps import AdminAccess, CatalogDep, GenerationDep, JobsDep, ReadAccess, StoreDep
from app.api.schemas import AdapterAccepted, AdapterCreate, AdapterList, Deleted, Name, error_responses
from app.api.submissions import delete_adapter, submit_adapter

router = APIRouter(tags=["adapters"], responses=error_responses(401, 403, 422))
ERRORS = error_responses(404, 409, 503)


@router.post(
    "/skills/{name}/adapters",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=AdapterAccepted,
    summary="Build an adapter for a target model from a skill (a job)",
    responses=ERRORS,
)
def create_adapter(name: str, body: AdapterCreate, _: AdminAccess, store: StoreDep, jobs: JobsDep, catalog: CatalogDep) -> dict:
    """Queues a tuning job. If the skill is still being extracted, the job waits for that one."""
    return submit_adapter(name, body, store=store, jobs=jobs, catalog=catalog)


@router.get("/adapters", response_model=AdapterList, summary="Stored adapters")
def list_adapters(
    _: ReadAccess, store: StoreDep, skill: Annotated[Name | None, Query()] = None, target: Annotated[Name | None, Query()] = None
) -> dict:
    out = []
    for manifest in store.list("adapter"):
        t, s = manifest["key"]
        if (skill is None or s == skill) and (target is None or t == target):
            out.append({"target": t, "skill": s, "manifest": manifest})
    return {"adapters": out}


@router.delete("/adapters/{target}/{skill}", response_model=Deleted, summary="Delete one adapter", responses=ERRORS)
def remove_adapter(target: str, skill: str, _: AdminAccess, store: StoreDep, jobs: JobsDep, generation: GenerationDep) -> dict:
    return delete_adapter(target, skill, store=store, jobs=jobs, generation=generation)
