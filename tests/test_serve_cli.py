"""`resa serve` and `resa worker` as real subprocesses.

Embedded mode (no RESA_REDIS_URL): one command starts a private redis-server and a local
worker next to the API, answers /livez, and stops all three cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from _helpers_jobs import REPO, wait_for
from conftest import free_port

CLI = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except FileNotFoundError:
        return ""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


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
        children = {pid: _cmdline(pid) for pid in _children(proc.pid)}
        assert any("redis-server" in c for c in children.values()), children
        assert any(" worker" in c for c in children.values()), children
        assert (tmp_path / "cache" / "redis" / "redis.sock").exists()
        wait_for(lambda: b"Listening on" in (tmp_path / "cache" / "redis" / "worker.log").read_bytes(), 30, 0.2, "the worker")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(pid) for pid in children):
        time.sleep(0.1)
    assert all(_gone(pid) for pid in children), {pid: _cmdline(pid) for pid in children}


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
