"""app/local: the demo's client against a real HTTP server on loopback (transient failures are
retried with backoff, one stderr line each; permanent ones end in a one-line DemoError), the
settings hash that names the demo's store (a rerun with the same settings resumes from it), the
demo's lock, and its server started again when it stops under a running job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from _helpers_jobs import REPO, wait_for
from _helpers_service import TINY_SAE
from conftest import arithmetic_rows, free_port


class Scripted(BaseHTTPRequestHandler):
    """Answers each path from a script: a list of (status, headers, body) used in turn, the last one
    repeated; status None drops the connection without an answer."""

    script: dict = {}
    hits: dict = {}

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        self.hits[path] = self.hits.get(path, 0) + 1
        steps = self.script[path]
        status, headers, body = steps[min(self.hits[path], len(steps)) - 1]
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        if status is None:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        data = json.dumps(body).encode()
        self.send_response(status)
        for key, value in {"content-type": "application/json", **headers}.items():
            self.send_header(key, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def _error(status: int, type: str, message: str, headers: dict | None = None):
    return (status, headers or {}, {"error": {"type": type, "message": message}})


OK = (200, {}, {"ok": True})


@pytest.fixture
def server():
    Scripted.script, Scripted.hits = {}, {}
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _client(url: str, **kw):
    from app.local.demo import DemoClient

    return DemoClient(url, **{"backoff_s": 0.01, "max_backoff_s": 0.05, "retry_s": 10.0, **kw})


def _retry_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("[demo] ")]


def test_transient_failures_are_retried_with_one_line_each(server, capsys):
    Scripted.script["/jobs/1"] = [_error(503, "queue_unavailable", "the job queue (Redis) is unreachable"), _error(502, "bad_gateway", "x"), OK]
    Scripted.script["/skills"] = [(None, {}, None), OK]  # a dropped connection
    client = _client(server)
    assert client.call("GET", "/jobs/1") == {"ok": True}
    assert client.call("POST", "/skills", json={"name": "s"}) == {"ok": True}
    assert Scripted.hits == {"/jobs/1": 3, "/skills": 2}
    lines = _retry_lines(capsys.readouterr().err)
    assert len(lines) == 3, lines
    assert lines[0].startswith("[demo] GET /jobs/1: 503 queue_unavailable: the job queue (Redis) is unreachable; retry 1 in ")
    assert lines[1].startswith("[demo] GET /jobs/1: 502 bad_gateway: x; retry 2 in ")
    assert lines[2].startswith("[demo] POST /skills: RemoteProtocolError") and "retry 1 in " in lines[2]


def test_429_waits_for_its_retry_after(server, capsys):
    Scripted.script["/generate"] = [_error(429, "rate_limit_exceeded", "queue full", {"Retry-After": "1"}), OK]
    t = time.monotonic()
    assert _client(server).call("POST", "/generate", json={}) == {"ok": True}
    assert time.monotonic() - t >= 0.9 and Scripted.hits["/generate"] == 2
    assert "retry 1 in 1.0s" in capsys.readouterr().err


def test_a_permanent_failure_is_one_line_and_not_retried(server, capsys):
    from app.local.demo import DemoError

    Scripted.script["/skills"] = [_error(400, "invalid_request", "layers: bad\nsecond line\n  third")]
    with pytest.raises(DemoError) as info:
        _client(server).call("POST", "/skills", json={"layers": [99]})
    message = str(info.value)
    assert message == "POST /skills -> 400 invalid_request: layers: bad second line third"
    assert info.value.status == 400 and info.value.type == "invalid_request"
    assert Scripted.hits == {"/skills": 1} and _retry_lines(capsys.readouterr().err) == []


def test_retries_are_bounded_and_end_in_one_line(server, capsys):
    from app.local.demo import DemoError

    Scripted.script["/jobs/2"] = [_error(503, "queue_unavailable", "Redis is down")]
    t = time.monotonic()
    with pytest.raises(DemoError) as info:
        _client(server, retry_s=0.5).call("GET", "/jobs/2")
    assert time.monotonic() - t < 5
    message = str(info.value)
    assert "\n" not in message and message.startswith("GET /jobs/2 failed ") and message.endswith("last: 503 queue_unavailable: Redis is down")
    assert Scripted.hits["/jobs/2"] >= 3 and len(_retry_lines(capsys.readouterr().err)) == Scripted.hits["/jobs/2"] - 1

    with pytest.raises(DemoError) as info:  # nothing listening at all
        _client(f"http://127.0.0.1:{free_port()}", retry_s=0.3).call("GET", "/readyz")
    assert "ConnectError" in str(info.value) and "\n" not in str(info.value)


def test_the_settings_hash_is_stable_and_covers_every_field():
    from app.local.demo import DemoConfig, config_hash

    base = DemoConfig.quick()
    assert config_hash(base) == config_hash(DemoConfig.quick()) and len(config_hash(base)) == 12
    seen = {config_hash(base)}
    for f in fields(DemoConfig):
        value = getattr(base, f.name)
        if isinstance(value, dict):
            changed = {**value, "lr": 0.5}
        else:
            changed = (not value) if isinstance(value, bool) else "other" if isinstance(value, str) else (value or 0) + 1
        seen.add(config_hash(replace(base, **{f.name: changed})))
    assert len(seen) == len(fields(DemoConfig)) + 1


def test_a_demo_already_running_with_the_same_settings_is_refused_in_one_line(tmp_path):
    """The demo's store is claimed for its run: a second run with the same settings and workdir stops
    at once with `resa demo: error: ...` and status 1, no traceback, nothing started."""
    from app.local.demo import DemoConfig, config_hash
    from app.local.embedded import DirLock

    work = tmp_path / "work"
    lock = DirLock(work / f"store-{config_hash(DemoConfig.quick())}.lock").acquire(owner="resa demo")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RESA_")}
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", "demo", "--quick", "--workdir", str(work), "--report-dir", str(tmp_path / "reports")],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )
    finally:
        lock.release()
    assert out.returncode == 1, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert lines[0].startswith("resa demo: error: demo store ") and f"is in use by pid {os.getpid()} (resa demo)" in lines[0]
    assert not list(work.glob("serve-*.log")) and not (tmp_path / "reports").exists()


# ---------------------------------------------------------------- a server that stops under the demo


def test_a_server_stopped_mid_job_is_started_again_and_the_job_resumes(tmp_path, models_file, capsys):
    """The demo's server is stopped (SIGTERM, as a restart or a crash of its stack would) while a job
    runs: the client notices, starts it again on the same port, whose embedded Redis still holds the
    job (checkpointed and re-queued by the worker), and the job resumes from its checkpoint."""
    from app.local.demo import DemoClient, DemoServer

    cache = Path(tempfile.mkdtemp(prefix="rsd-", dir="/tmp"))  # short: the embedded Redis gets a unix socket
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESA_")}
    env.update(RESA_STORE_URL=f"file://{tmp_path / 'store'}", RESA_CACHE_DIR=str(cache), RESA_MODELS_FILE=str(models_file),
               RESA_DEFAULT_MODEL="tiny-llama", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RESA_DRAIN_TIMEOUT_S="20")
    server = DemoServer(env, tmp_path / "serve.log", ready_timeout_s=120).start()
    try:
        client = DemoClient(server.url, server=server, backoff_s=0.2, max_backoff_s=1.0, retry_s=60)
        server.wait_ready()
        body = "".join(r.to_json() + "\n" for r in arithmetic_rows(200))
        dataset = client.call("POST", "/datasets", content=body, headers={"content-type": "application/x-ndjson"})["id"]
        train = {"chunk_len": 32, "batch_size": 4, "max_tokens": 100_000, "heldout_max_tokens": 256, "epochs": 50}
        job_id = client.call("POST", "/skills", json={"name": "s", "source": {"model": "tiny-llama"}, "layers": [1], "dataset": dataset,
                                                     "sae": TINY_SAE, "train": train})["job"]["id"]

        def progressing():
            view = httpx.get(f"{server.url}/jobs/{job_id}", timeout=5).json()
            assert view["state"] in ("queued", "started"), (view["error"], server.last_line())
            return view["progress"]["step"] > 0

        wait_for(progressing, 120, 0.2, "the job to make progress")
        first_pid = server.proc.pid
        server.proc.send_signal(signal.SIGTERM)
        done = client.wait_job(job_id, "extract s")
        assert server.proc.pid != first_pid and server.restarts == 1
        assert done["state"] == "finished" and done["result"]["manifest"]["resumed"] is True, done
        lines = _retry_lines(capsys.readouterr().err)
        assert f"[demo] `resa serve` stopped (status 0); starting it again on port {server.port} (restart 1 of 3)" in lines, lines
        assert all(line.startswith(f"[demo] GET /jobs/{job_id}: ") for line in lines if "starting it again" not in line), lines
    finally:
        server.stop()
        shutil.rmtree(cache, ignore_errors=True)
