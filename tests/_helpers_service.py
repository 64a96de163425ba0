"""A running service for tests: real Redis, a real `resa worker` subprocess, the app in a TestClient.

Module-scoped: the worker and app are started once per test module; each module gets its
own queue name and store, so modules never see each other's jobs.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from _helpers_jobs import WorkerProcess, wait_for

TINY_TRAIN = {"chunk_len": 32, "batch_size": 4, "max_tokens": 2048, "heldout_max_tokens": 256}
TINY_SAE = {"num_latents": 128, "k": 8}


@dataclass
class Service:
    settings: object
    env: dict
    root: Path
    client: object = None
    worker: WorkerProcess | None = None
    workers: list = field(default_factory=list)

    def start_worker(self) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.root / f"worker-{len(self.workers)}.log").start()
        self.workers.append(worker)
        self.worker = worker
        return worker

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop()

    def jobs(self):
        from app.jobs import JobQueue

        return JobQueue.from_url(self.settings.redis_url, self.settings)

    def wait_job(self, job_id: str, states=("finished", "failed", "canceled"), timeout_s: float = 90.0) -> dict:
        def done():
            view = self.client.get(f"/jobs/{job_id}").json()
            return view if view["state"] in states else None

        try:
            return wait_for(done, timeout_s, 0.3, f"job {job_id} to reach {states}")
        except AssertionError:
            logs = "\n".join(w.output() for w in self.workers)
            view = self.client.get(f"/jobs/{job_id}").json()
            raise AssertionError(f"job {job_id} stuck in {view}\nworker logs:\n{logs}") from None


def service_env(tmp: Path, models_file: Path, cache_dir: Path, redis_url: str, **extra) -> dict:
    env = {
        "RESA_STORE_URL": f"file://{tmp / 'store'}",
        "RESA_MODELS_FILE": str(models_file),
        "RESA_CACHE_DIR": str(cache_dir),
        "RESA_DEFAULT_MODEL": "tiny-llama",
        "RESA_REDIS_URL": redis_url,
        "RESA_QUEUES": f"test-{uuid.uuid4().hex[:8]}",
        "RESA_API_KEYS": "",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }
    return env


@contextmanager
def configured_service(tmp: Path, models_file: Path, cache_dir: Path, redis_url: str, *, kind: "type[Service] | None" = None, worker: bool = True, **extra):
    """The environment set (service_env + extra), settings read from it, a `kind` (Service by default)
    around them and, optionally, a worker; undone on exit. The app is the caller's to build."""
    from app.settings import Settings, get_settings

    env = service_env(tmp, models_file, cache_dir, redis_url, **extra)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        get_settings.cache_clear()
        settings = Settings()
        service = (kind or Service)(settings=settings, env={**os.environ}, root=tmp)
        if worker:
            service.start_worker()
        try:
            yield service
        finally:
            service.stop_workers()
            get_settings.cache_clear()


def start_service(tmp: Path, models_file: Path, cache_dir: Path, redis_url: str, *, worker: bool = True, **extra):
    """Set the environment, build the app and (optionally) start a worker; a generator for fixtures."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with configured_service(tmp, models_file, cache_dir, redis_url, worker=worker, **extra) as service:
        with TestClient(create_app(service.settings)) as client:
            service.client = client
            yield service


def upload_rows(client, rows) -> str:
    body = "".join(r.to_json() + "\n" for r in rows)
    res = client.post("/datasets", content=body, headers={"content-type": "application/x-ndjson"})
    assert res.status_code == 201, res.text
    return res.json()["id"]


def wait_ready(client, timeout_s: float = 60.0) -> None:
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout_s, 0.2, "readyz")


class UvicornThread:
    """An app served by uvicorn on a loopback port, in a thread of the test process (a real HTTP server
    that clients, browsers and disconnects can reach)."""

    def __init__(self, app, port: int):
        import uvicorn

        self.url, self.app = f"http://127.0.0.1:{port}", app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> "UvicornThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
