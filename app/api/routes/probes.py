"""Probes, open to all: /livez (process up), /readyz (Redis, store, default model), /metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from app.api.deps import GenerationDep, SettingsDep, StoreDep
from app.api.errors import error_response
from app.api.schemas import ErrorResponse, Liveness, Readiness

router = APIRouter(tags=["probes"])


@router.get("/livez", response_model=Liveness, summary="The process is up (GET or HEAD)")
def livez() -> dict:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Redis reachable, store reachable, default model loaded (GET or HEAD)",
    responses={503: {"model": ErrorResponse, "description": "Not ready; `checks` says which check failed."}},
)
def readyz(request: Request, settings: SettingsDep, store: StoreDep, generation: GenerationDep):
    checks = {}
    jobs = request.app.state.jobs
    if jobs is None:
        checks["redis"] = {"ok": False, "detail": "no Redis configured (RESA_REDIS_URL)"}
    else:
        try:
            jobs.connection.ping()
            checks["redis"] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            checks["redis"] = {"ok": False, "detail": f"unreachable: {exc}"}
    checks["store"] = {"ok": True} if store.ping() else {"ok": False, "detail": f"cannot list {settings.store_url}"}
    model = settings.default_model
    if model:
        if generation.is_loaded(model):
            checks["model"] = {"ok": True, "detail": model}
        else:
            error = generation.load_error(model)
            checks["model"] = {"ok": False, "detail": f"{model}: {error}" if error else f"{model} is loading"}
    else:
        checks["model"] = {"ok": True, "detail": "no default model (loaded on first use)"}
    failed = [name for name, check in checks.items() if not check["ok"]]
    if failed:
        return error_response(request, 503, "not_ready", f"not ready: {', '.join(failed)}", checks=checks)
    return {"status": "ready", "checks": checks}


# Gateways and load balancers probe with HEAD too.
router.add_api_route("/livez", livez, methods=["HEAD"], include_in_schema=False)
router.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
