"""Datasets of verified QA rows: upload (JSONL or {"rows": [...]}), list, inspect.

Rows are validated and normalized (resa_engine.data) before they are stored under the
sha256 of their normalized JSONL, which is the dataset id; the same rows uploaded twice
give the same id. Uploading needs the `evals` permission (admin and generate keys) and fits in the
datasets budget (RESA_DATASETS_MAX_BYTES, all datasets together); deleting one needs an admin key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json

from fastapi import APIRouter, Request, status
from pydantic import ValidationError

from app.api.deps import AdminAccess, EvalAccess, ReadAccess, SettingsDep, StoreDep
from app.api.errors import ApiError, Invalid, TooLarge
from app.api.schemas import DatasetInfo, DatasetList, DatasetUpload, Deleted, error_responses

router = APIRouter(tags=["datasets"], responses=error_responses(401, 403, 422))

JSONL_TYPES = ("application/x-ndjson", "application/jsonl", "application/x-jsonlines", "application/json-lines", "text/plain")

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-ndjson": {"schema": {"type": "string", "description": "One QA object per line."}},
            "application/json": {"schema": DatasetUpload.model_json_schema()},
        },
    }
}


def _parse(body: bytes, content_type: str, max_bytes: int, max_rows: int) -> list:
    """Validated QARows (DatasetError, a 422 naming every bad line, on bad rows)."""
    from resa_engine.data import DatasetError, parse_qa_jsonl, parse_qa_rows

    try:
        if content_type in JSONL_TYPES:
            return parse_qa_jsonl(body, max_bytes=max_bytes, max_rows=max_rows)
        return parse_qa_rows(_json_rows(body), max_rows=max_rows)
    except DatasetError as exc:
        if not exc.problems and "more than" in str(exc):
            raise TooLarge(str(exc), type="too_many_rows") from None
        raise


def _json_rows(body: bytes) -> list:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise Invalid(f"body is not valid JSON ({exc})", type="invalid_json") from None
    except RecursionError:
        raise Invalid("body is JSON nested too deeply", type="invalid_json") from None
    try:
        return DatasetUpload.model_validate(payload).rows
    except ValidationError as exc:
        first = str(exc).splitlines()[0]
        raise Invalid('a JSON body must be {"rows": [...]} (send JSONL as application/x-ndjson)', detail=first) from None


@router.post(
    "/datasets",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetInfo,
    summary="Upload QA rows (JSONL or {\"rows\": [...]})",
    openapi_extra=_UPLOAD_BODY,
    responses=error_responses(413, 415),
)
async def upload_dataset(request: Request, _: EvalAccess, settings: SettingsDep, store: StoreDep) -> dict:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in JSONL_TYPES and content_type != "application/json":
        raise ApiError(
            f"unsupported content type {content_type!r}; send application/x-ndjson (JSONL) or application/json",
            type="unsupported_media_type",
            status=415,
        )
    body = await request.body()
    if not body.strip():
        raise Invalid("empty body: send JSONL rows or {\"rows\": [...]}", type="invalid_dataset")

    def parse_and_store() -> dict:
        from resa_engine.data import rows_to_jsonl

        rows = _parse(body, content_type, settings.max_body_bytes, settings.max_dataset_rows)
        jsonl = rows_to_jsonl(rows)
        used = store.datasets_bytes()
        if used + len(jsonl) > settings.datasets_max_bytes and not store.has_dataset(hashlib.sha256(jsonl).hexdigest()):
            raise TooLarge(
                f"storing these {len(jsonl)} bytes would pass the datasets budget ({used} of {settings.datasets_max_bytes} bytes used); "
                "delete datasets no longer needed (DELETE /datasets/{id}, admin)",
                type="datasets_budget_exceeded",
            )
        return store.put_dataset(jsonl, len(rows)).to_dict()

    return await asyncio.to_thread(parse_and_store)


@router.get("/datasets", response_model=DatasetList, summary="Stored datasets")
def list_datasets(_: ReadAccess, store: StoreDep) -> dict:
    return {"datasets": [d.to_dict() for d in store.list_datasets()]}


@router.get("/datasets/{dataset_id}", response_model=DatasetInfo, summary="One dataset", responses=error_responses(404))
def get_dataset(dataset_id: str, _: ReadAccess, store: StoreDep) -> dict:
    return store.dataset_info(dataset_id).to_dict()


@router.delete("/datasets/{dataset_id}", response_model=Deleted, summary="Delete a dataset (admin)", responses=error_responses(404))
def delete_dataset(dataset_id: str, _: AdminAccess, store: StoreDep) -> dict:
    """Frees its share of the datasets budget. Skills and adapters built from it keep its sha256 in their
    manifests; jobs that still need it fail with `unknown_dataset`."""
    store.delete_dataset(dataset_id)
    return {"deleted": {"dataset": dataset_id}}
