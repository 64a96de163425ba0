"""The FastAPI application: wires settings, store, job queue, generation, routers, middleware, errors.

`create_app(settings)` builds one app; `resa serve` runs it with uvicorn. Importing this
module does not import torch: models load lazily (the default one in the background at
start), and the job routes only enqueue.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.api.errors import install_error_handlers
from app.api.metrics import Metrics
from app.api.middleware import AuthGate, BodyLimit, RequestContext
from app.api.routes import adapters, datasets, evals, generate, jobs, models, probes, skills, sources
from app.api.routes import transparency, ui
from app.api.routes import openai as openai_routes
from app.services.catalog import ModelCatalog
from app.services.generation import GenerationService
from app.jobs import JobQueue, connect
from app.logging import configure_logging
from app.settings import Settings, get_settings

log = logging.getLogger("resa.api")
SUPERVISE_EVERY_S = 3.0

DESCRIPTION = """Skill transfer with sparse autoencoders (SAE-Tuning, arXiv 2506.09967).

Extract a reasoning **skill** from a source model (`POST /skills`), build an **adapter** for a
target model (`POST /skills/{name}/adapters`), and generate with a skill attached per request
(`POST /generate`). Long work runs as background jobs (`/jobs`). Errors always have the shape
`{"error": {"type", "message", ...}}`. Authenticate with `Authorization: Bearer <key>`.
"""


def create_app(settings: Settings | None = None, *, load_default_model: bool = True, supervise: bool = True) -> FastAPI:
    """The service. `load_default_model`: start loading settings.default_model at startup;
    `supervise`: periodically fail dead jobs and release dependents of failed ones."""
    settings = settings or get_settings()
    configure_logging(settings.log_json, settings.log_level)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Blocking work (model, adapter and SAE loads, store reads) runs here; one torch thread each
        # keeps the CPU cores' OpenMP threads for the decode engines (resa_engine.threads).
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(thread_name_prefix="resa-io", initializer=_helper_thread))
        if not app.state.api_keys:
            log.warning(
                "*** DEVELOPMENT MODE: no API keys configured (RESA_API_KEYS); every route is open to anyone "
                "who can reach this port. Set RESA_API_KEYS=key:admin,... before exposing the service. ***"
            )
        if load_default_model and settings.default_model:
            app.state.generation.start_loading(settings.default_model)
        task = asyncio.create_task(_supervise(app.state.jobs)) if supervise and app.state.jobs is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            app.state.generation.close()

    app = FastAPI(title="resa", version=_version(), description=DESCRIPTION, lifespan=lifespan)
    store = settings.open_store()
    catalog = ModelCatalog(settings)
    app.state.settings = settings
    app.state.store = store
    app.state.api_keys = settings.keys
    app.state.catalog = catalog
    app.state.generation = GenerationService(settings, store, catalog)
    app.state.jobs = JobQueue(connect(settings.redis_url), settings) if settings.redis_url else None
    app.state.metrics = metrics
    metrics.bind(app.state.jobs, app.state.generation)

    for module in (probes, models, datasets, sources, skills, adapters, jobs, evals, generate):
        app.include_router(module.router)
    app.include_router(transparency.router)
    app.include_router(openai_routes.router)
    app.include_router(ui.router)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_bytes))
    app.add_middleware(AuthGate)  # before the body is read: no key, no parsing
    app.add_middleware(RequestContext, metrics=metrics)  # outermost: every response gets an id
    return app


def _helper_thread() -> None:
    from resa_engine.threads import helper_thread

    helper_thread()


async def _supervise(jobs: JobQueue) -> None:
    while True:
        await asyncio.sleep(SUPERVISE_EVERY_S)
        try:
            await asyncio.to_thread(jobs.reap)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis down or a bad record: try again next round
            log.debug("supervision pass skipped: %s", exc)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("resa")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "0.0.0"
