"""The scale-out deployment of docs/deploy.md on one machine, from real parts: one redis-server,
one S3-compatible store (moto in server mode), two `resa worker` processes and two `resa serve`
replicas on their own ports, each process with its own RESA_CACHE_DIR (as if on its own host).

Everything binds to free loopback ports and lives under one temp folder; `Deployment.stop()`
ends every process it started (by its own handle, never by name), also after a failed start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from _helpers_jobs import REPO, wait_for
from _helpers_reliability import CLI, ServeProcess, base_env, gone
from conftest import RedisServer, free_port

BUCKET = "resa-scale"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


class MotoServer:
    """moto's S3 in server mode (`python -m moto.server`) as a subprocess on a free loopback port."""

    def __init__(self, log_path: Path):
        self.port, self.log_path, self.proc = free_port(), Path(log_path), None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "MotoServer":
        self._log = open(self.log_path, "ab")
        env = {**os.environ, **AWS_ENV}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

        def up() -> bool:
            assert self.proc.poll() is None, f"moto exited with {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}"
            try:
                return httpx.get(f"{self.url}/moto-api/", timeout=2).status_code < 500
            except httpx.HTTPError:
                return False

        wait_for(up, 60, 0.2, "the moto S3 server")
        return self

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=name)

    def stop(self) -> None:
        from app.local.embedded import stop_process

        stop_process(self.proc, 15)
        if self.proc is not None:
            self._log.close()


class NamedWorker:
    """`resa worker --name NAME` as a real subprocess."""

    def __init__(self, name: str, env: dict, log_path: Path):
        self.name, self.env, self.log_path, self.proc = name, env, Path(log_path), None

    def start(self) -> "NamedWorker":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*CLI, "worker", "--name", self.name], cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the worker dies at once, with no chance to report on its running job."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None:
            self._log.close()

    def output(self, tail: int = 5000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")


class Replica:
    """One `resa serve` replica and an HTTP client for it."""

    def __init__(self, label: str, env: dict, log_path: Path):
        self.label = label
        self.serve = ServeProcess(env, log_path)
        self.http = httpx.Client(base_url=self.serve.url, timeout=120)

    def get(self, path: str, **kw) -> httpx.Response:
        return self.http.get(path, **kw)

    def post(self, path: str, **kw) -> httpx.Response:
        return self.http.post(path, **kw)

    def delete(self, path: str, **kw) -> httpx.Response:
        return self.http.delete(path, **kw)

    def skills(self) -> dict[str, list[str]]:
        """GET /skills as {skill: [targets with an adapter]}."""
        res = self.get("/skills")
        assert res.status_code == 200, res.text
        return {s["name"]: s["adapters"] for s in res.json()["skills"]}

    def model_ids(self) -> set[str]:
        res = self.get("/v1/models")
        assert res.status_code == 200, res.text
        return {m["id"] for m in res.json()["data"]}

    def stop(self) -> None:
        self.http.close()
        self.serve.stop()


@dataclass
class Deployment:
    root: Path
    models_file: Path
    queue: str = field(default_factory=lambda: f"scale-{uuid.uuid4().hex[:8]}")
    redis: RedisServer | None = None
    moto: MotoServer | None = None
    workers: list[NamedWorker] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    extra_pids: dict[int, str] = field(default_factory=dict)
    """Job processes (work horses) seen during the tests (pid -> command line), ended at teardown if still running."""

    def env(self, cache_dir: Path) -> dict:
        return base_env(
            RESA_STORE_URL=f"s3://{BUCKET}/store",
            RESA_STORE_OPTIONS=json.dumps({"client_kwargs": {"endpoint_url": self.moto.url}}),
            RESA_REDIS_URL=self.redis.url,
            RESA_QUEUES=self.queue,
            RESA_MODELS_FILE=str(self.models_file),
            RESA_DEFAULT_MODEL="tiny-llama",
            RESA_API_KEYS="",
            RESA_DEVICE="cpu",
            RESA_ENGINE_THREADS="1",
            RESA_CACHE_DIR=str(cache_dir),
            RESA_DRAIN_TIMEOUT_S="5",
            **AWS_ENV,
        )

    def start(self) -> "Deployment":
        # assigned before started: a start that fails half-way still leaves stop() the process to end
        self.redis = RedisServer(_mkdir(self.root / "redis"))
        self.redis.start()
        self.moto = MotoServer(self.root / "moto.log")
        self.moto.start()
        self.moto.create_bucket(BUCKET)
        tag = self.queue.removeprefix("scale-")
        for i in range(2):
            name = f"scale-w{i}-{tag}"
            env = self.env(_mkdir(self.root / f"worker{i}-cache"))
            worker = NamedWorker(name, env, self.root / f"worker{i}.log")
            self.workers.append(worker)
            worker.start()
        for label in ("A", "B"):
            env = self.env(_mkdir(self.root / f"replica{label}-cache"))
            replica = Replica(label, env, self.root / f"replica{label}.log")
            self.replicas.append(replica)
            replica.serve.start()
        for replica in self.replicas:
            replica.serve.wait_ready(180)
        wait_for(lambda: self.idle_workers() == {w.name for w in self.workers}, 120, 0.3, "both workers to be idle on the queue")
        return self

    def connection(self):
        import redis

        if getattr(self, "_conn", None) is None:
            self._conn = redis.Redis.from_url(self.redis.url)
        return self._conn

    def idle_workers(self) -> set[str]:
        """Names of the workers registered in Redis, listening on this deployment's queue and idle."""
        from rq import Worker

        for w in self.workers:
            assert w.alive or w.proc.returncode == -signal.SIGKILL, f"worker {w.name} exited:\n{w.output()}"
        from rq.serializers import JSONSerializer

        registered = Worker.all(connection=self.connection(), serializer=JSONSerializer)
        return {w.name for w in registered if self.queue in w.queue_names() and w.get_state() == "idle"}

    def rq_job(self, job_id: str):
        from rq.job import Job
        from rq.serializers import JSONSerializer

        return Job.fetch(job_id, connection=self.connection(), serializer=JSONSerializer)

    def close(self) -> None:
        if getattr(self, "_conn", None) is not None:
            self._conn.close()

    def logs(self) -> str:
        parts = [f"--- {w.name} ---\n{w.output()}" for w in self.workers]
        parts += [f"--- replica {r.label} ---\n{r.serve.output()}" for r in self.replicas]
        return "\n".join(parts)

    def starts_of(self, job_id: str) -> dict[str, int]:
        """How often each worker's log says it started the job (run_job's "job <id> (<kind>) started")."""
        pattern = re.compile(rf"job {re.escape(job_id)} \(\w+\) started")
        return {w.name: len(pattern.findall(w.text())) for w in self.workers}

    def wait_job(self, replica: Replica, job_id: str, timeout_s: float = 150.0, states=("finished", "failed", "canceled")) -> dict:
        def done():
            res = replica.get(f"/jobs/{job_id}")
            assert res.status_code == 200, res.text
            view = res.json()
            return view if view["state"] in states else None

        try:
            return wait_for(done, timeout_s, 0.5, f"job {job_id} to reach {states}")
        except AssertionError:
            view = replica.get(f"/jobs/{job_id}").json()
            raise AssertionError(f"job {job_id} stuck in {view}\n{self.logs()}") from None

    def stop(self) -> None:
        """End every process this deployment started, each on its own (one failing stop never skips the rest):
        SIGTERM to every replica and worker at once, then wait for each (SIGKILL if it does not end)."""
        procs = [r.serve.proc for r in self.replicas] + [w.proc for w in self.workers]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        steps = [r.stop for r in self.replicas] + [w.stop for w in self.workers]
        steps += [self._end_extra_pids, self.close]
        steps += [self.moto.stop] if self.moto else []
        steps += [self.redis.stop] if self.redis else []
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - keep stopping the others
                print(f"teardown step {step} failed: {exc!r}", file=sys.stderr)

    def track(self, pid: int) -> None:
        """Remember a job process (a worker's work horse) so teardown ends it if it outlives its worker."""
        cmdline = cmdline_of(pid)
        if cmdline:
            self.extra_pids[pid] = cmdline

    def _end_extra_pids(self) -> None:
        for pid, cmdline in self.extra_pids.items():
            if not gone(pid) and cmdline_of(pid) == cmdline:  # still that process, not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def cmdline_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def wait_gone(pid: int, timeout_s: float = 30.0) -> None:
    wait_for(lambda: gone(pid), timeout_s, 0.2, f"process {pid} to exit")

