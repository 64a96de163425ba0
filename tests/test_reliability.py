"""Reliability: faults injected into the real service, on loopback, with tiny models.

Real Redis servers (one with an append-only file, stopped and restarted mid-job), real
`resa worker` and `resa serve` processes (SIGTERM, SIGKILL), a real store (a commit killed
mid-copy, an adapter file with flipped bytes), a load run and a schema-driven fuzz run
(schemathesis) against a `resa serve` subprocess. Every fault's outcome is recorded and
printed as a table when the module ends. Data lost must always be "none".

The worker SIGKILLed mid-job with a small task is tests/test_jobs.py
(test_worker_sigkilled_mid_job_is_detected_and_reported_failed); here it is a real tune job.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from _helpers_jobs import SLEEP_TASK, WorkerProcess, wait_for
from _helpers_reliability import (
    Outcome,
    ServeProcess,
    base_env,
    gone,
    json_lines,
    kill_mid_commit,
    outcome_table,
    write_big_artifact,
)
from _helpers_service import service_env, start_service
from _helpers_tune import make_skill, random_adapter
from conftest import arithmetic_rows
from test_jobs import sleep_job, started_with_progress
from app.tasks import staging_for

SHUTDOWN_REASON = "worker shut down; resumable from checkpoint"
OUTCOMES: list[Outcome] = []
LOAD_USERS = 8
LOAD_SECONDS = 8.0
RSS_GROWTH_LIMIT = 256 << 20


@pytest.fixture(scope="module", autouse=True)
def fault_table(request):
    """Prints `fault injected | outcome | data lost` once the module's tests have run."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and OUTCOMES:
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            reporter.write_line("")
            for line in outcome_table(OUTCOMES):
                reporter.write_line(line)


# ---------------------------------------------------------------- services


@pytest.fixture(scope="module")
def redis_aof(tmp_path_factory):
    """A Redis with an append-only file (as deployed) that tests stop and start: the embedded one."""
    from app.local.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("aof") / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def svc(tmp_path_factory, models_file, session_cache_dir, redis_aof):
    """The app in-process (TestClient) with a real `resa worker` subprocess, on the restartable Redis."""
    yield from start_service(tmp_path_factory.mktemp("rel"), models_file, session_cache_dir, redis_aof.url)


@pytest.fixture(scope="module")
def api(tmp_path_factory, models_file, session_cache_dir, redis_server):
    """`resa serve` as a subprocess on loopback (no worker: nothing it queues ever starts)."""
    tmp = tmp_path_factory.mktemp("api-proc")
    env = service_env(tmp, models_file, session_cache_dir, redis_server.url, RESA_MAX_NEW_TOKENS="8", RESA_DRAIN_TIMEOUT_S="10")
    server = ServeProcess(base_env(**env), tmp / "serve.log").start()
    server.store_root = tmp / "store"
    try:
        server.wait_ready(180)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory, registry, session_cache_dir):
    """A PEFT LoRA adapter for tiny-llama (random B), built on a private copy of the model."""
    from resa_engine.models import load_model

    model = load_model(registry.get("tiny-llama"), device="cpu", cache_dir=session_cache_dir)
    folder = random_adapter(model, tmp_path_factory.mktemp("adapter"))
    return folder, json.loads((folder / "manifest.json").read_text())


# ---------------------------------------------------------------- readiness


def test_readyz_is_503_until_model_redis_and_store_are_all_there(tmp_path, models_file, session_cache_dir):
    from fastapi.testclient import TestClient

    from app.local.embedded import EmbeddedRedis
    from app.main import create_app
    from app.settings import Settings

    red = EmbeddedRedis(tmp_path / "redis").start()
    settings = Settings(
        store_url=f"file://{tmp_path / 'store'}", models_file=models_file, cache_dir=session_cache_dir, redis_url=red.url,
        default_model="tiny-llama", queues="rel-ready", api_keys="",
    )  # fmt: skip
    app = create_app(settings, load_default_model=False, supervise=False)
    try:
        with TestClient(app) as client:
            res = client.get("/readyz")
            assert res.status_code == 503 and res.json()["error"]["type"] == "not_ready"
            checks = res.json()["error"]["checks"]
            assert checks["model"]["ok"] is False and checks["redis"]["ok"] and checks["store"]["ok"]

            app.state.generation.start_loading("tiny-llama").join(120)
            assert client.get("/readyz").status_code == 200

            red.stop()
            res = client.get("/readyz")
            assert res.status_code == 503 and res.json()["error"]["checks"]["redis"]["ok"] is False
            assert client.get("/livez").status_code == 200
            red.start()
            wait_for(lambda: client.get("/readyz").status_code == 200, 30, 0.2, "readyz after Redis is back")

            # a local store whose root vanished (a lost volume) is not reachable
            shutil.rmtree(tmp_path / "store")
            res = client.get("/readyz")
            assert res.status_code == 503 and res.json()["error"]["checks"]["store"]["ok"] is False
            (tmp_path / "store").mkdir()
            assert client.get("/readyz").status_code == 200
    finally:
        red.stop()


# ---------------------------------------------------------------- logs


def test_logs_are_json_lines_with_the_request_id(api):
    res = httpx.get(f"{api.url}/models", headers={"X-Request-ID": "rel-log-1"}, timeout=30)
    assert res.status_code == 200 and res.headers["x-request-id"] == "rel-log-1"

    def logged():
        return [line for line in json_lines(api.log_path) if line.get("request_id") == "rel-log-1"]

    (line,) = wait_for(logged, 10, 0.1, "the request's log line")
    assert line["logger"] == "resa.api" and line["level"] == "INFO" and line["job_id"] is None
    assert line["method"] == "GET" and line["path"] == "/models" and line["status"] == 200 and line["duration_ms"] >= 0
    assert set(line) >= {"ts", "level", "logger", "msg", "request_id", "job_id"}
    text = api.log_path.read_text()
    assert all(line.startswith("{") for line in text.splitlines() if line), "every log line is one JSON object"
    entries = json_lines(api.log_path)
    assert any(entry["logger"].startswith("uvicorn") for entry in entries)  # the server's own lines too
    assert any(entry["level"] == "WARNING" and "DEVELOPMENT MODE" in entry["msg"] for entry in entries)


def test_text_logs_and_context_ids(capsys):
    import logging

    from app.logging import configure_logging, job_id_var, request_id_var

    log = logging.getLogger("resa.test")
    try:
        configure_logging(json=False, level="DEBUG")
        token = job_id_var.set("job-7")
        log.debug("step %d", 3)
        job_id_var.reset(token)
        configure_logging(json=True, level="INFO")
        token = request_id_var.set("req-9")
        log.debug("hidden")
        try:
            raise KeyError("k")
        except KeyError:
            log.exception("failed", extra={"skill": "arith"})
        request_id_var.reset(token)
        with pytest.raises(ValueError, match="unknown log level"):
            configure_logging(level="LOUD")
    finally:
        configure_logging(json=True, level="INFO")
    ours = [line for line in capsys.readouterr().err.splitlines() if "resa.test" in line]
    assert len(ours) == 2 and ours[0].endswith(" DEBUG resa.test: step 3 [job_id=job-7]")
    line = json.loads(ours[1])
    assert line["msg"] == "failed" and line["level"] == "ERROR" and line["request_id"] == "req-9" and line["job_id"] is None
    assert line["skill"] == "arith" and "KeyError" in line["exc"]


# ---------------------------------------------------------------- a corrupted artifact


def test_corrupted_adapter_file_is_a_409_naming_the_file_and_the_service_stays_up(api, good_adapter):
    from adapters_store import ArtifactStore

    folder, manifest = good_adapter
    store = ArtifactStore(f"file://{api.store_root}")
    store.commit("adapter", ("tiny-llama", "rel-corrupt"), folder, manifest)
    weights = api.store_root / "adapters" / "tiny-llama" / "rel-corrupt" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0xFF  # flip bytes inside the tensor data; size and header stay plausible
    weights.write_bytes(bytes(data))

    req = {"prompt": "What is 2 + 2?", "max_tokens": 4, "seed": 1}
    res = httpx.post(f"{api.url}/generate", json={**req, "skill": "rel-corrupt"}, timeout=60)
    assert res.status_code == 409, res.text
    error = res.json()["error"]
    assert error["type"] == "artifact_corrupt"
    assert "adapter_model.safetensors" in error["message"] and "rel-corrupt" in error["message"]
    assert httpx.get(f"{api.url}/livez", timeout=10).status_code == 200
    plain = httpx.post(f"{api.url}/generate", json=req, timeout=60)
    assert plain.status_code == 200, plain.text
    assert any(e["level"] == "ERROR" and "adapter_model.safetensors" in e["msg"] for e in json_lines(api.log_path))

    # the operator's fix: commit the adapter again; the same request then works
    store.commit("adapter", ("tiny-llama", "rel-corrupt"), folder, manifest, replace=True)
    fixed = httpx.post(f"{api.url}/generate", json={**req, "skill": "rel-corrupt"}, timeout=60)
    assert fixed.status_code == 200 and fixed.json()["skill"] == "rel-corrupt", fixed.text
    OUTCOMES.append(
        Outcome(
            "adapter_model.safetensors bytes flipped in the store",
            "generate with the skill: 409 artifact_corrupt naming the file; without: 200; after re-commit: 200",
            "none (the corrupt file is refused, never loaded)",
        )
    )


# ---------------------------------------------------------------- load


def test_load_run_has_no_server_errors_and_bounded_memory(api, good_adapter):
    from adapters_store import ArtifactStore

    folder, manifest = good_adapter
    ArtifactStore(f"file://{api.store_root}").commit("adapter", ("tiny-llama", "rel-load"), folder, manifest, replace=True)

    async def run() -> tuple[Counter, int, int, int]:
        statuses: Counter = Counter()
        async with httpx.AsyncClient(base_url=api.url, timeout=120) as client:
            for skill in (None, "rel-load"):  # warm up both paths before the first measure
                body = {"prompt": "warm up", "max_tokens": 2, **({"skill": skill} if skill else {})}
                assert (await client.post("/generate", json=body)).status_code == 200
            before = api.rss_bytes()
            deadline = time.monotonic() + LOAD_SECONDS

            async def user(i: int) -> None:
                n = 0
                while time.monotonic() < deadline:
                    body = {"prompt": f"What is {i} + {n}?", "max_tokens": 8, "temperature": 0.7, "seed": n}
                    if n % 2:
                        body["skill"] = "rel-load"
                    statuses[(await client.post("/generate", json=body)).status_code] += 1
                    n += 1

            await asyncio.gather(*(user(i) for i in range(LOAD_USERS)))
            peak = api.rss_bytes()
        return statuses, before, peak, sum(statuses.values())

    statuses, before, after, total = asyncio.run(run())
    growth = after - before
    print(f"load: {total} requests from {LOAD_USERS} users in {LOAD_SECONDS:g} s: {dict(statuses)}; "
          f"server RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB ({growth / 2**20:+.1f} MiB)")  # fmt: skip
    assert total >= LOAD_USERS and not any(code >= 500 for code in statuses), statuses
    assert set(statuses) == {200}, statuses
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew {growth / 2**20:.1f} MiB under load"
    OUTCOMES.append(
        Outcome(
            f"load: {LOAD_USERS} concurrent users for {LOAD_SECONDS:g} s (half with a skill)",
            f"{total} requests, all 200, 0 5xx; RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MiB ({growth / 2**20:+.1f})",
        )
    )


# ---------------------------------------------------------------- a commit killed mid-copy


def test_commit_killed_mid_copy_leaves_nothing_visible_and_a_later_commit_works(tmp_path, session_cache_dir):
    from adapters_store import ArtifactNotFound, ArtifactStore

    src = tmp_path / "big"
    total = write_big_artifact(src)
    root = tmp_path / "store"
    root.mkdir()
    killed = kill_mid_commit(root, session_cache_dir, "rel-big", src, total)
    assert killed.returncode == -signal.SIGKILL, "the commit finished before it could be killed"
    assert 0 < killed.staged_bytes < killed.total_bytes  # mid-copy: some bytes written, not all

    store = ArtifactStore(f"file://{root}", cache_dir=session_cache_dir)
    assert not store.exists("skill", ("rel-big",))
    assert [m["name"] for m in store.list("skill")] == []
    with pytest.raises(ArtifactNotFound):
        store.fetch("skill", ("rel-big",))
    assert not (root / "skills" / "rel-big").exists()  # nothing under the artifact's own path at all

    store.commit("skill", ("rel-big",), src, {"name": "rel-big", "layers": [0], "default_layer": 0, "d_in": 64})
    fetched = store.fetch("skill", ("rel-big",))  # every file verified against the manifest
    assert sum(f.stat().st_size for f in fetched.rglob("*.safetensors")) == total
    OUTCOMES.append(
        Outcome(
            "SIGKILL during ArtifactStore.commit (copying a 128 MiB skill)",
            f"killed with {killed.staged_bytes:,} of {total:,} bytes staged: nothing visible; "
            "the same commit again succeeds",
            "none (the commit never happened; the source files are intact)",
        )
    )


# ---------------------------------------------------------------- Redis restarted mid-job


def test_redis_restart_while_a_job_runs(svc, redis_aof):
    job_id = sleep_job(svc, "rel-redis", steps=100, delay_s=0.1)
    started_with_progress(svc, job_id)
    redis_aof.stop()
    try:
        # down for at least one worker heartbeat: the worker must ride it out, not quit
        wait_for(lambda: "Redis unreachable" in svc.worker.output(), 20, 0.2, "a heartbeat to fail")
        down = svc.client.get(f"/jobs/{job_id}")
        assert down.status_code == 503 and down.json()["error"]["type"] == "queue_unavailable"
        assert svc.client.get("/jobs").status_code == 503
        ready = svc.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["checks"]["redis"]["ok"] is False
        gen = svc.client.post("/generate", json={"prompt": "What is 1 + 1?", "max_tokens": 2})
        assert gen.status_code == 200, gen.text  # generation does not need Redis
    finally:
        redis_aof.start()
    wait_for(lambda: svc.client.get("/readyz").status_code == 200, 30, 0.2, "readyz after the restart")
    view = svc.wait_job(job_id, timeout_s=120)
    assert view["state"] == "finished", view  # the job and its worker rode out the restart
    assert svc.worker.proc.poll() is None, svc.worker.output()
    assert svc.client.get("/skills/rel-redis").status_code == 200
    assert svc.client.get("/jobs").status_code == 200
    OUTCOMES.append(
        Outcome(
            "Redis (AOF) stopped and restarted while a job runs",
            "job routes 503 and /readyz 503 while down, /generate 200; after: 2xx, job finished, worker alive",
        )
    )


# ---------------------------------------------------------------- workers


def test_worker_sigkilled_mid_tune_job_leaves_no_adapter_and_the_rerun_resumes(svc, tmp_path, monkeypatch):
    import app.jobs.queue

    store = svc.client.app.state.store
    make_skill(store, "rel-tune", tmp_path / "skill", d_in=64, layers=(1,), rows=arithmetic_rows(60, seed=3))
    body = {"target": "tiny-llama", "max_steps": 150, "chunk_len": 32, "lr": 1e-3, "train": {"checkpoint_every": 2}}
    res = svc.client.post("/skills/rel-tune/adapters", json=body)
    assert res.status_code == 202, res.text
    job_id = res.json()["job"]["id"]

    def past_a_checkpoint():
        view = svc.client.get(f"/jobs/{job_id}").json()
        assert view["state"] in ("queued", "started"), view
        return view["state"] == "started" and view["progress"]["step"] >= 4

    wait_for(past_a_checkpoint, 120, 0.1, "tuning to pass a checkpoint")
    monkeypatch.setattr(app.jobs.queue, "ABANDONED_AFTER_S", 5)  # notice the dead worker sooner than in production
    svc.worker.kill()
    view = svc.wait_job(job_id, timeout_s=90)
    monkeypatch.undo()
    assert view["state"] == "failed" and view["error"]["type"] == "worker_died", view
    assert not store.exists("adapter", ("tiny-llama", "rel-tune"))
    assert not (svc.root / "store" / "adapters" / "tiny-llama" / "rel-tune").exists()
    assert svc.client.get("/adapters", params={"skill": "rel-tune"}).json()["adapters"] == []
    checkpoint = staging_for(svc.settings).path("adapter", "tiny-llama", "rel-tune") / "checkpoint"
    assert checkpoint.exists()

    svc.start_worker()
    again = svc.client.post("/skills/rel-tune/adapters", json=body)
    assert again.status_code == 202, again.text
    done = svc.wait_job(again.json()["job"]["id"], timeout_s=180)
    assert done["state"] == "finished", done
    train = done["result"]["manifest"]["train"]
    assert train["resumed_from"] >= 2 and train["steps"] == 150
    assert store.exists("adapter", ("tiny-llama", "rel-tune"))
    OUTCOMES.append(
        Outcome(
            "worker SIGKILLed mid tune job",
            f"job failed worker_died; no adapter visible; the same request resumed at step {train['resumed_from']} and finished",
            "none (the steps since the last checkpoint, at most 2 optimizer steps, are redone)",
        )
    )


def test_worker_sigterm_checkpoints_requeues_and_the_next_worker_resumes(svc):
    job_id = sleep_job(svc, "rel-term", steps=60, delay_s=0.1)
    started_with_progress(svc, job_id)
    worker = svc.worker
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0, worker.output()

    view = svc.client.get(f"/jobs/{job_id}").json()
    assert view["state"] == "queued" and view["status"] == "queued", view
    meta = svc.jobs().fetch(job_id).get_meta()
    assert meta["interrupted"]["reason"] == SHUTDOWN_REASON and meta["interrupted"]["count"] == 1
    ckpt = staging_for(svc.settings).path("skill", "rel-term") / "checkpoint.json"
    stopped_at = json.loads(ckpt.read_text())["step"]
    assert 0 < stopped_at < 60
    assert svc.client.get("/skills/rel-term").status_code == 404

    svc.start_worker()
    done = svc.wait_job(job_id, timeout_s=120)
    assert done["state"] == "finished" and done["result"]["resumed_from"] == stopped_at, done
    assert svc.client.get("/skills/rel-term").status_code == 200
    # the job's own lines, from the job process, carry its id
    lines = [e for e in json_lines(worker.log_path) if e.get("job_id") == job_id]
    assert any(SHUTDOWN_REASON in e["msg"] for e in lines), worker.output()
    OUTCOMES.append(
        Outcome(
            "resa worker SIGTERM mid-job",
            f"job checkpointed at step {stopped_at}, back in the queue ({SHUTDOWN_REASON!r}); worker exit 0; "
            "the next worker resumed it and finished",
        )
    )


def test_worker_kills_a_job_that_ignores_the_stop_after_the_drain_timeout(svc):
    for worker in svc.workers:
        worker.stop()  # idle: SIGTERM stops it at once
    worker = WorkerProcess({**svc.env, "RESA_DRAIN_TIMEOUT_S": "1"}, svc.root / "worker-drain.log").start()
    svc.workers.append(worker)
    svc.worker = worker
    job_id = sleep_job(svc, "rel-stubborn", steps=600, delay_s=0.1, ignore_stop=True)
    started_with_progress(svc, job_id)
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.proc.wait(60) == 0, worker.output()
    view = svc.wait_job(job_id, timeout_s=30)
    assert view["state"] == "failed" and view["error"]["type"] == "worker_shutdown", view
    assert view["error"]["message"].startswith(SHUTDOWN_REASON) and "drain timeout (1 s)" in view["error"]["message"]
    assert svc.client.get("/skills/rel-stubborn").status_code == 404
    svc.start_worker()
    OUTCOMES.append(
        Outcome(
            "resa worker SIGTERM, job ignores the stop",
            "killed after RESA_DRAIN_TIMEOUT_S; failed worker_shutdown with the reason; worker exit 0",
            "none committed; steps since its last checkpoint are redone on resubmit",
        )
    )


# ---------------------------------------------------------------- resa serve: graceful shutdown


def test_serve_sigterm_drains_a_generation_checkpoints_the_job_and_stops_in_order(tmp_path, models_file):
    from app.jobs import JobQueue
    from app.local.embedded import data_dir_for
    from app.settings import Settings

    env = base_env(
        RESA_STORE_URL=f"file://{tmp_path / 'store'}", RESA_CACHE_DIR=str(tmp_path / "cache"),
        RESA_MODELS_FILE=str(models_file), RESA_DEFAULT_MODEL="tiny-llama", RESA_DRAIN_TIMEOUT_S="60",
    )  # fmt: skip

    def queue_of(server: ServeProcess) -> JobQueue:
        """The job queue on a server's own embedded Redis (per address: a unix socket in its data dir, or a
        loopback port when that path is too long), read from its log."""
        data_dir = str(data_dir_for(tmp_path / "cache", "127.0.0.1", server.port))
        urls = [e["msg"].split()[3] for e in json_lines(server.log_path) if e["msg"].startswith("embedded Redis at ") and data_dir in e["msg"]]
        return JobQueue.from_url(urls[-1], Settings(redis_url=urls[-1], queues="resa", store_url=env["RESA_STORE_URL"]))

    serve = ServeProcess(env, tmp_path / "serve-1.log").start()
    try:
        serve.wait_ready(180)
        jobs = queue_of(serve)
        job = jobs.enqueue("extract", {"name": "rel-serve", "steps": 100, "delay_s": 0.1}, task=SLEEP_TASK, meta={"skill": "rel-serve"})
        wait_for(lambda: jobs.view(job.id)["progress"]["step"] > 0, 60, 0.1, "the job to report progress")
        children = serve.children()
        assert len(children) == 2  # redis-server and the local worker

        with ThreadPoolExecutor(1) as pool:
            body = {"prompt": "What is 2 + 2?", "max_tokens": 400}
            pending = pool.submit(httpx.post, f"{serve.url}/generate", json=body, timeout=180)
            wait_for(serve.has_client, 30, 0.01, "the generate request to reach the server")
            time.sleep(0.2)  # let the server read the request before the signal
            serve.terminate()
            in_flight = not pending.done()
            res = pending.result()
        assert res.status_code == 200, res.text
        assert res.json()["usage"]["completion_tokens"] >= 1
        assert serve.wait(180) == 0, serve.output()
    finally:
        serve.stop()
    assert all(gone(pid) for pid in children)
    log = json_lines(serve.log_path)
    assert any("Shutting down" in e["msg"] for e in log)

    # next start: the embedded worker resumes the job from its checkpoint
    again = ServeProcess({**env, "RESA_DEFAULT_MODEL": ""}, tmp_path / "serve-2.log", port=serve.port).start()  # same address, same Redis data
    try:
        again.wait_live(120)
        jobs = queue_of(again)  # the same Redis data, behind a new socket
        meta = jobs.fetch(job.id).get_meta()
        assert meta["interrupted"]["reason"] == SHUTDOWN_REASON, meta
        done = wait_for(lambda: (v := jobs.view(job.id))["state"] in ("finished", "failed") and v, 120, 0.2, "the resumed job")
        assert done["state"] == "finished" and done["result"]["resumed_from"] > 0, done
        assert again.stop() == 0, again.output()
    finally:
        again.stop()
    OUTCOMES.append(
        Outcome(
            "resa serve (embedded) SIGTERM with a generation in flight and a job running",
            f"generation {'drained' if in_flight else 'done'}: 200; job checkpointed and re-queued; worker, Redis, "
            f"API exit 0; next start resumed the job at step {done['result']['resumed_from']}",
        )
    )


# ---------------------------------------------------------------- the OpenAPI contract (schemathesis)

CONTRACT_EXAMPLES = 15
"""Generated requests per operation and mode (valid and invalid data): bounded, seeded."""
CONTRACT_SKIP = {("GET", "/jobs/{job_id}/events")}
"""It streams until the job ends, and with no worker behind this server a job it queued never ends.
Job submissions are fuzzed: with no worker they only queue."""


def test_openapi_contract_no_server_errors_and_responses_match_the_schema(api):
    """Every operation of the served OpenAPI document, fed schemathesis-generated valid and invalid
    requests: never a 5xx, and every response matches the documented schema."""
    schemathesis = pytest.importorskip("schemathesis")  # a dev dependency
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import response_schema_conformance

    config = schemathesis.Config.from_dict({"seed": 20260, "request-timeout": 60})
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config)
    checks = [not_a_server_error, response_schema_conformance]
    sent: Counter = Counter()
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 20
    for op in operations:
        if (op.method.upper(), op.path) in CONTRACT_SKIP:
            continue
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(
                max_examples=CONTRACT_EXAMPLES, deadline=None, database=None, derandomize=True,
                phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
            )  # fmt: skip
            def call(case) -> None:
                response = case.call_and_validate(checks=checks)
                sent[response.status_code // 100] += 1

            try:
                call()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE  # nothing to get wrong: no parameters, no body
            except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - collect every operation's failures, report them all
                failures.append(f"{op.method.upper()} {op.path} ({mode.value}): {type(exc).__name__}: {str(exc)[:1500]}")
    print(f"schemathesis: {len(operations)} operations, responses by class: {dict(sent)}")
    assert not failures, "\n\n".join(failures)
    assert sent[5] == 0 and sent[2] > 0 and sent[4] > 0
    OUTCOMES.append(
        Outcome(
            f"schemathesis: valid + invalid requests to {len(operations) - len(CONTRACT_SKIP)} operations",
            f"{sum(sent.values())} requests: {sent[2]} 2xx, {sent[4]} 4xx, 0 5xx; all responses match the schema",
        )
    )
