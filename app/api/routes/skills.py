"""Skills: extract one (a job, optionally chained to adapter jobs), list, inspect, delete.

DELETE /skills/{name} also deletes every adapter built from the skill; it answers 409
while a job is building the skill or one of its adapters.
"""

from __future__ import annotations

from fastapi import APIRouter, status

from app.api.deps import AdminAccess, CatalogDep, GenerationDep, JobsDep, ReadAccess, StoreDep
from app.api.schemas import Deleted, SkillAccepted, SkillCreate, SkillInfo, SkillList, error_responses
from app.api.submissions import delete_skill, submit_skill

router = APIRouter(tags=["skills"], responses=error_responses(401, 403, 422))
ERRORS = error_responses(404, 409, 503)


def _adapters_by_skill(store) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for manifest in store.list("adapter"):
        target, skill = manifest["key"]
        out.setdefault(skill, []).append(target)
    return out


def _info(manifest: dict, adapters: list[str]) -> dict:
    return {"name": manifest["key"][0], "manifest": manifest, "metrics": manifest.get("metrics") or {}, "adapters": sorted(adapters)}


@router.post(
    "/skills", status_code=status.HTTP_202_ACCEPTED, response_model=SkillAccepted, summary="Extract a skill (a job)", responses=ERRORS
)
def create_skill(body: SkillCreate, _: AdminAccess, store: StoreDep, jobs: JobsDep, catalog: CatalogDep) -> dict:
    """Queues an extraction job; with `adapters_for`, one adapter job per target that starts when the
    extraction finishes and is canceled, with the reason, if it fails."""
    return submit_skill(body, store=store, jobs=jobs, catalog=catalog)


@router.get("/skills", response_model=SkillList, summary="Stored skills")
def list_skills(_: ReadAccess, store: StoreDep) -> dict:
    adapters = _adapters_by_skill(store)
    return {"skills": [_info(m, adapters.get(m["key"][0], [])) for m in store.list("skill")]}


@router.get("/skills/{name}", response_model=SkillInfo, summary="One skill: manifest, metrics, adapters", responses=ERRORS)
def get_skill(name: str, _: ReadAccess, store: StoreDep) -> dict:
    manifest = store.manifest("skill", (name,))
    return _info(manifest, _adapters_by_skill(store).get(name, []))


@router.delete("/skills/{name}", response_model=Deleted, summary="Delete a skill and its adapters", responses=ERRORS)
def remove_skill(name: str, _: AdminAccess, store: StoreDep, jobs: JobsDep, generation: GenerationDep) -> dict:
    """Deletes the skill and every adapter built from it (an adapter is named by its skill, so it
    must not outlive it). 409 while a job is extracting the skill or building one of its adapters."""
    return delete_skill(name, store=store, jobs=jobs, generation=generation)
