"""The demo as a client of the service: its own `resa serve` (DemoServer, started again if it stops) and
an HTTP client that retries transient failures with backoff and reports a permanent one in one line
(DemoClient, DemoError), the way a platform client would talk to the service."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx


class DemoError(RuntimeError):
    """A failure the demo reports in one line (`resa demo: error: ...`), with what the server said."""

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None, body: dict | None = None,
                 job_error: str | None = None):
        super().__init__(one_line(message))
        self.status, self.type, self.body, self.job_error = status, type, body or {}, job_error


TRANSIENT_STATUS = frozenset({502, 503, 504})
"""Answers worth asking again (429 too, after its Retry-After)."""


RESUBMIT_ERRORS = frozenset({"worker_died", "worker_shutdown"})
"""A job that failed for one of these was interrupted, not wrong: submit it again (its task resumes
from the checkpoint in its staging folder)."""


def one_line(text: str, limit: int = 400) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def say(message: str) -> None:
    """One line on stderr that leaves progress bars intact."""
    from tqdm import tqdm

    tqdm.write(f"[demo] {one_line(message, 300)}", file=sys.stderr)


def _error_of(r: httpx.Response) -> tuple[str | None, str, dict]:
    """(type, message, body) of an error answer in the API's shape, or its text."""
    try:
        body = r.json()
    except ValueError:
        return None, r.text.strip() or r.reason_phrase, {}
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return err.get("type"), str(err.get("message") or ""), err
    return None, json.dumps(body)[:300], {}


def _retry_after(r: httpx.Response) -> float | None:
    value = r.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


class DemoServer:
    """The demo's `resa serve` (embedded Redis and worker) on one loopback port for the whole run.

    If it stops under the demo, it is started again on the same port, which reuses its embedded
    Redis data (cache_dir/redis/127.0.0.1-<port>): queued and interrupted jobs are still there.
    It gets SIGTERM if the demo dies, so no server outlives its demo.
    """

    def __init__(self, env: dict, log_path: Path, port: int | None = None, *, max_restarts: int = 3, ready_timeout_s: float = 300):
        self.env, self.log_path, self.port = env, Path(log_path), port or _free_port()
        self.max_restarts, self.ready_timeout_s = max_restarts, ready_timeout_s
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._log = None

    def start(self) -> "DemoServer":
        from app.local.embedded import _die_with_parent

        if self._log is None:
            self._log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )
        return self

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def last_line(self) -> str:
        try:
            lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while time.monotonic() < deadline:
                if self.exited():
                    raise DemoError(
                        f"`resa serve` exited with status {self.proc.returncode} before it was ready: {self.last_line()} (log: {self.log_path})"
                    )
                try:
                    if http.get("/readyz").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(1)
        raise DemoError(f"`resa serve` not ready after {self.ready_timeout_s:.0f}s (log: {self.log_path})")

    def restart(self) -> None:
        """Start it again on the same port; a few tries, since its Redis may still be letting go of its data."""
        code = self.proc.returncode if self.proc is not None else None
        for attempt in range(1, 6):
            if self.restarts >= self.max_restarts:
                raise DemoError(f"`resa serve` stopped {self.restarts + 1} times (last status {code}); giving up (log: {self.log_path})")
            self.restarts += 1
            say(f"`resa serve` stopped (status {code}); starting it again on port {self.port} (restart {self.restarts} of {self.max_restarts})")
            self.start()
            try:
                self.wait_ready()
                return
            except DemoError as exc:
                if not self.exited():
                    raise
                code = self.proc.returncode
                say(f"restart failed: {exc}")
                time.sleep(2.0 * attempt)
        raise DemoError(f"`resa serve` did not come back (log: {self.log_path})")

    def stop(self) -> None:
        from app.local.embedded import stop_process

        stop_process(self.proc, 90)
        if self._log is not None:
            self._log.close()
            self._log = None


class DemoClient:
    """The demo talks to the service exactly as a platform client would.

    Transient failures (no connection, a timeout, 502/503/504, 429 after its Retry-After) are
    retried with exponential backoff for up to `retry_s` in all, one line on stderr per retry;
    with a `server` that has stopped, it is started again first. Anything else, or retries
    exhausted, raises DemoError with a one-line message.
    """

    def __init__(self, base_url: str, api_key: str | None = None, *, server: DemoServer | None = None, retry_s: float = 120.0,
                 backoff_s: float = 1.0, max_backoff_s: float = 15.0, timeout_s: float = 60.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, headers=headers, timeout=httpx.Timeout(timeout_s, connect=10.0))
        self.server, self.retry_s, self.backoff_s, self.max_backoff_s = server, retry_s, backoff_s, max_backoff_s

    def call(self, method: str, path: str, **kw) -> dict:
        where = f"{method} {path}"
        started = time.monotonic()
        deadline, delay, tries = started + self.retry_s, self.backoff_s, 0
        while True:
            tries += 1
            try:
                r = self.http.request(method, path, **kw)
            except httpx.TransportError as exc:
                reason, wait = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__, delay
            else:
                if r.status_code < 400:
                    return r.json() if r.content else {}
                kind, message, body = _error_of(r)
                reason = f"{r.status_code}{' ' + kind if kind else ''}: {message}"
                if r.status_code == 429:
                    wait = _retry_after(r)
                    wait = delay if wait is None else wait
                elif r.status_code in TRANSIENT_STATUS:
                    wait = delay
                else:
                    raise DemoError(f"{where} -> {reason}", status=r.status_code, type=kind, body=body)
            if self.server is not None and self.server.exited():
                self.server.restart()
                deadline, delay = time.monotonic() + self.retry_s, self.backoff_s
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoError(f"{where} failed {tries} times in {time.monotonic() - started:.0f}s; last: {reason}")
            wait = min(wait, left)
            say(f"{where}: {reason}; retry {tries} in {wait:.1f}s")
            time.sleep(wait)
            delay = min(delay * 2, self.max_backoff_s)

    def get_or_none(self, path: str, **kw) -> dict | None:
        """GET, or None on a 404 (the artifact is not there)."""
        try:
            return self.call("GET", path, **kw)
        except DemoError as exc:
            if exc.status == 404:
                return None
            raise

    def wait_job(self, job_id: str, label: str) -> dict:
        """Poll the job (each poll retried like any call, so a Redis restart is waited out) until it ends."""
        from tqdm import tqdm

        bar = tqdm(desc=label, total=1, unit="step", file=sys.stderr, dynamic_ncols=True)
        try:
            while True:
                job = self.call("GET", f"/jobs/{job_id}")
                prog = job.get("progress") or {}
                if prog.get("total"):
                    bar.total = prog["total"]
                    bar.n = prog.get("step", 0)
                    stage = prog.get("stage")
                    if stage:
                        bar.set_description(f"{label} [{stage}]", refresh=False)
                        bar.unit = "tok" if stage == "extract" else "step"  # extraction counts tokens
                    metrics = prog.get("metrics") or {}
                    bar.set_postfix({k: f"{v:.4g}" for k, v in list(metrics.items())[:3]}, refresh=False)
                    bar.refresh()
                if job["state"] in ("finished", "failed", "canceled"):
                    if job["state"] != "finished":
                        error = job.get("error") or {}
                        raise DemoError(
                            f"{label} job {job_id} {job['state']}: {error.get('type', '?')}: {error.get('message', '')}",
                            job_error=error.get("type"),
                        )
                    return job
                time.sleep(1)
        finally:
            bar.close()

    def run_job(self, label: str, submit, attempts: int = 3) -> dict | None:
        """submit() -> a job id (None: the artifact is already there); wait for it. A job lost to a worker
        that died or shut down, or to a Redis that lost it, is submitted again and resumes from its checkpoint."""
        for attempt in range(1, attempts + 1):
            job_id = submit()
            if job_id is None:
                return None
            try:
                return self.wait_job(job_id, label)
            except DemoError as exc:
                lost = exc.job_error in RESUBMIT_ERRORS or (exc.status == 404 and exc.type == "unknown_job")
                if not lost or attempt == attempts:
                    raise
                say(f"{label}: job {job_id} was interrupted ({exc.job_error or exc.type}); submitting it again (attempt {attempt + 1})")
        return None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def submit_job(client: DemoClient, path: str, body: dict) -> str | None:
    """POST a job; a 409 because the same work is already running gives that job, because it is
    already done gives None (a retried POST whose first try got through lands here)."""
    try:
        return client.call("POST", path, json=body)["job"]["id"]
    except DemoError as exc:
        if exc.status == 409 and exc.type == "job_in_progress" and exc.body.get("job"):
            say(f"POST {path}: already running as job {exc.body['job']}; waiting for it")
            return exc.body["job"]
        if exc.status == 409 and exc.type == "name_taken":
            return None
        raise
