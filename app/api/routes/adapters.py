"""Adapters: build one for a target from a skill (a job), list, delete."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, status
from fastapi.responses import PlainTextResponse, Response

from app.api.errors import NotFound
from app.api.deps import AdminAccess, CatalogDep, GenerationDep, JobsDep, ReadAccess, StoreDep
from app.api.schemas import AdapterAccepted, AdapterCreate, AdapterList, Deleted, Name, error_responses
from app.api.submissions import delete_adapter, submit_adapter

router = APIRouter(tags=["adapters"], responses=error_responses(401, 403, 422))
ERRORS = error_responses(404, 409, 503)


@router.post(
    "/skills/{name}/adapters", status_code=status.HTTP_202_ACCEPTED, response_model=AdapterAccepted,
    summary="Build an adapter for a target model from a skill (a job)", responses=ERRORS,
)  # fmt: skip
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


@router.get(
    "/skills/{name}/adapters/{target}/report",
    summary="The transfer report of a skill on a target: arms, paired differences, diagnostics (JSON, markdown, PNG, SVG)",
    responses={
        200: {"content": {"application/json": {}, "text/markdown": {}, "image/png": {}, "image/svg+xml": {}}},
        **error_responses(404, 409),
    },
)
def transfer_report(
    name: str,
    target: str,
    _: ReadAccess,
    store: StoreDep,
    fmt: Annotated[Literal["json", "md", "png", "svg"], Query(alias="format", description="`json` (default), `md`, `png` or `svg`.")] = "json",
    report: Annotated[Name | None, Query(description="Which kept evaluation (default: the latest).")] = None,
):
    """From the skill's and the adapter's manifests (recipe, transfer diagnostics) and the latest evaluation
    of the skill on the target (`POST /evals` with `skill` keeps its report beside the adapter)."""
    from resa_engine.transfer_report import render_chart, to_markdown
    from resa_engine.transfer_report import transfer_report as build

    skill_manifest, adapter_manifest = store.manifest("skill", (name,)), store.manifest("adapter", (target, name))
    names = store.reports(target, name)
    if report is not None and report not in names:
        raise NotFound(f"no evaluation report {report!r} for {target}/{name} (kept: {', '.join(names) or 'none'})", type="unknown_report")
    chosen = report or (names[-1] if names else None)
    evaluation = store.get_report(target, name, chosen) if chosen else None
    source = skill_manifest.get("source") or {}
    method = None
    if source.get("adapter") and store.exists("adapter", (source["model"], source["adapter"])):
        method = store.manifest("adapter", (source["model"], source["adapter"])).get("origin")  # sft / grpo
    data = {**build(skill_manifest, adapter_manifest, evaluation, source_method=method), "report_name": chosen, "reports": names}
    if fmt == "json":
        return data
    if fmt == "md":
        return PlainTextResponse(to_markdown(data), media_type="text/markdown; charset=utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        body = render_chart(data, Path(tmp) / f"report.{fmt}", fmt=fmt).read_bytes()
    return Response(body, media_type={"png": "image/png", "svg": "image/svg+xml"}[fmt])


@router.delete("/adapters/{target}/{skill}", response_model=Deleted, summary="Delete one adapter", responses=ERRORS)
def remove_adapter(target: str, skill: str, _: AdminAccess, store: StoreDep, jobs: JobsDep, generation: GenerationDep) -> dict:
    return delete_adapter(target, skill, store=store, jobs=jobs, generation=generation)
