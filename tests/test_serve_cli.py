"""`resa serve` and `resa worker` as real subprocesses.

Embedded mode (no RESA_REDIS_URL): one command starts a private redis-server and a local
worker next to the API, answers /livez, and stops all three cleanly on SIGTERM. Its Redis
data directory is cache_dir/redis/<host>-<port>, locked for the life of the service: two
services on one cache dir and different ports run side by side, a second one on the same
address is refused with one line and leaves the first alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from _helpers_jobs import REPO, wait_for
from _helpers_reliability import gone
from _helpers_scale import cmdline_of
from _helpers_service import TINY_SAE, TINY_TRAIN
from conftest import arithmetic_rows, free_port

CLI = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _env(tmp_path, models_file, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESA_")}
    env.update(
        RESA_STORE_URL=f"file://{tmp_path / 'store'}",
        RESA_CACHE_DIR=str(tmp_path / "cache"),
        RESA_MODELS_FILE=str(models_file),
        RESA_DEFAULT_MODEL="",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    return env


def test_serve_embedded_runs_redis_and_a_worker_and_stops_them(tmp_path, models_file):
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port)], cwd=REPO, env=_env(tmp_path, models_file), stdout=log, stderr=subprocess.STDOUT)
    try:
        def live():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                return False

        wait_for(live, 60, 0.2, "resa serve to answer /livez")
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()
        assert ready["checks"]["redis"]["ok"] is True, ready  # the embedded Redis is up and used
        children = {pid: cmdline_of(pid) for pid in _children(proc.pid)}
        assert any("redis-server" in c for c in children.values()), children
        assert any(" worker" in c or c.startswith("rq:worker:") for c in children.values()), children  # RQ retitles its process
        data_dir = tmp_path / "cache" / "redis" / f"127.0.0.1-{port}"
        assert json.loads((data_dir / "lock").read_text())["pid"] == proc.pid
        sock = data_dir / "redis.sock"
        if len(str(sock)) < 100:  # else Redis listens on a loopback port (a unix socket path has a length limit)
            assert sock.exists()
        wait_for(lambda: b"Listening on" in (data_dir / "worker.log").read_bytes(), 30, 0.2, "the worker")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(gone(pid) for pid in children):
        time.sleep(0.1)
    assert all(gone(pid) for pid in children), {pid: cmdline_of(pid) for pid in children}


def test_worker_needs_a_redis_url(tmp_path, models_file):
    out = subprocess.run([*CLI, "worker"], cwd=REPO, env=_env(tmp_path, models_file), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "RESA_REDIS_URL" in out.stderr


def test_worker_reports_an_unreachable_redis(tmp_path, models_file):
    env = _env(tmp_path, models_file, RESA_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    out = subprocess.run([*CLI, "worker"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "cannot reach Redis" in out.stderr


def test_serve_refuses_a_bad_port(tmp_path, models_file):
    out = subprocess.run([*CLI, "serve", "--port", "70000"], cwd=REPO, env=_env(tmp_path, models_file), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--port" in out.stderr


# ---------------------------------------------------------------- two services, one cache dir


@pytest.fixture
def short_cache():
    """A cache dir with a short path, so each embedded Redis listens on its unix socket."""
    path = Path(tempfile.mkdtemp(prefix="rsv-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Serve:
    """`resa serve --port PORT` in embedded mode, as a subprocess."""

    def __init__(self, env: dict, log_path: Path, port: int | None = None):
        self.env, self.log_path, self.port = env, log_path, port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([*CLI, "serve", "--port", str(self.port)], cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def get(self, path: str, **kw):
        return httpx.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, **kw):
        return httpx.post(self.url + path, timeout=30, **kw)

    def wait_ready(self, timeout_s: float = 90) -> "Serve":
        def ready():
            assert self.proc.poll() is None, f"resa serve exited with {self.proc.returncode}:\n{self.output()}"
            try:
                return self.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout_s, 0.2, f"resa serve on port {self.port} to be ready")
        return self

    def extract(self, name: str, dataset: str) -> str:
        body = {"name": name, "source": {"model": "tiny-llama"}, "layers": [1], "dataset": dataset, "sae": TINY_SAE, "train": TINY_TRAIN}
        res = self.post("/skills", json=body)
        assert res.status_code == 202, res.text
        return res.json()["job"]["id"]

    def wait_job(self, job_id: str, timeout_s: float = 120) -> dict:
        def done():
            view = self.get(f"/jobs/{job_id}").json()
            return view if view["state"] in ("finished", "failed", "canceled") else None

        try:
            return wait_for(done, timeout_s, 0.3, f"job {job_id}")
        except AssertionError:
            raise AssertionError(f"job {job_id} stuck: {self.get(f'/jobs/{job_id}').json()}\n{self.output()}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self.log.close()


def _dataset(serve: Serve) -> str:
    body = "".join(r.to_json() + "\n" for r in arithmetic_rows(60))
    res = serve.post("/datasets", content=body, headers={"content-type": "application/x-ndjson"})
    assert res.status_code == 201, res.text
    return res.json()["id"]


def _ping(sock: Path) -> bool:
    import redis

    return redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=2).ping()


def test_two_embedded_services_share_a_cache_dir_on_different_ports(tmp_path, models_file, short_cache):
    env = {**_env(tmp_path, models_file), "RESA_CACHE_DIR": str(short_cache), "OMP_NUM_THREADS": "1"}
    a = Serve(env, tmp_path / "a.log")
    b = Serve(env, tmp_path / "b.log")
    try:
        a.wait_ready()
        b.wait_ready()
        dirs = {s: short_cache / "redis" / f"127.0.0.1-{s.port}" for s in (a, b)}
        for s, d in dirs.items():  # each its own Redis, on its own socket, locked by its own service
            assert json.loads((d / "lock").read_text())["pid"] == s.proc.pid and _ping(d / "redis.sock")
        dataset = _dataset(a)
        view = a.wait_job(a.extract("from-a", dataset))
        assert view["state"] == "finished", (view, a.output())
        # B's job is queued while A stops: A's shutdown takes nothing of B's with it
        job_b = b.extract("from-b", dataset)
        assert a.stop() == 0, a.output()
        assert not (dirs[a] / "redis.sock").exists()
        assert b.proc.poll() is None and _ping(dirs[b] / "redis.sock")
        assert b.get("/readyz").json()["checks"]["redis"]["ok"] is True
        view = b.wait_job(job_b)
        assert view["state"] == "finished", (view, b.output())
        assert view["started_at"] and view["worker"]
        assert {s["name"] for s in b.get("/skills").json()["skills"]} == {"from-a", "from-b"}  # one store, two queues
    finally:
        codes = [s.stop() for s in (a, b)]
    assert codes == [0, 0], (a.output(), b.output())


def test_a_second_service_on_the_same_address_is_refused_and_leaves_the_first_alone(tmp_path, models_file, short_cache):
    env = {**_env(tmp_path, models_file), "RESA_CACHE_DIR": str(short_cache), "OMP_NUM_THREADS": "1"}
    first = Serve(env, tmp_path / "first.log").wait_ready()
    data_dir = short_cache / "redis" / f"127.0.0.1-{first.port}"
    try:
        sock_inode = (data_dir / "redis.sock").stat().st_ino
        files = sorted(p.name for p in data_dir.iterdir())
        out = subprocess.run(
            [*CLI, "serve", "--port", str(first.port)], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2, (out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1, out.stderr
        assert lines[0].startswith("resa serve: error: embedded Redis data directory "), lines
        assert str(data_dir) in lines[0] and f"pid {first.proc.pid}" in lines[0] and f"127.0.0.1:{first.port}" in lines[0]
        assert "--port" in lines[0] and "RESA_CACHE_DIR" in lines[0] and "RESA_REDIS_URL" in lines[0]
        # nothing was touched: the same socket file and files, and the first one still answers
        assert (data_dir / "redis.sock").stat().st_ino == sock_inode
        assert sorted(p.name for p in data_dir.iterdir()) == files
        assert _ping(data_dir / "redis.sock")
        assert json.loads((data_dir / "lock").read_text())["pid"] == first.proc.pid
        assert first.get("/readyz").status_code == 200
    finally:
        code = first.stop()
    assert code == 0, first.output()
    # once it is gone, the address is free again: a restart reuses the same data (job history survives)
    again = Serve(env, tmp_path / "again.log", port=first.port).wait_ready()
    try:
        assert json.loads((data_dir / "lock").read_text())["pid"] == again.proc.pid and _ping(data_dir / "redis.sock")
    finally:
        assert again.stop() == 0, again.output()
