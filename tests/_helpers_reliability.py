"""Fault-injection helpers: `resa serve` as a real subprocess, JSON log lines, a commit killed
mid-copy, and the outcome table of the reliability suite."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from _helpers_jobs import REPO, wait_for
from conftest import free_port

CLI = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))"]


def base_env(**resa: str) -> dict:
    """This process's environment without any RESA_* variable, plus `resa`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESA_")}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **resa})
    return env


class ServeProcess:
    """`resa serve` as a real subprocess on a free loopback port."""

    def __init__(self, env: dict, log_path: Path, port: int | None = None):
        self.env, self.log_path, self.port = env, Path(log_path), port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServeProcess":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*CLI, "serve", "--port", str(self.port)], cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        return self

    def _answers(self, path: str, status: int) -> bool:
        assert self.proc.poll() is None, f"resa serve exited with {self.proc.returncode}:\n{self.output()}"
        try:
            return httpx.get(self.url + path, timeout=5).status_code == status
        except httpx.HTTPError:
            return False

    def wait_live(self, timeout_s: float = 90) -> "ServeProcess":
        wait_for(lambda: self._answers("/livez", 200), timeout_s, 0.2, "resa serve to answer /livez")
        return self

    def wait_ready(self, timeout_s: float = 120) -> "ServeProcess":
        wait_for(lambda: self._answers("/readyz", 200), timeout_s, 0.2, "resa serve to be ready")
        return self

    def has_client(self) -> bool:
        """A client connection to the server's port is established (the request reached it)."""
        import psutil

        conns = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        return any(c.status == psutil.CONN_ESTABLISHED and c.laddr.port == self.port for c in conns)

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss

    def children(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 120) -> int:
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._log.flush()

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]


def json_lines(path: Path) -> list[dict]:
    """The JSON log lines of a file (others, e.g. a library's own warning lines, are skipped)."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def gone(pid: int) -> bool:
    """Exited (a zombie counts: it has exited, its parent just has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


# ---------------------------------------------------------------- a commit killed mid-copy

COMMIT_CODE = """
import sys
from adapters_store import ArtifactStore
store = ArtifactStore(sys.argv[1], cache_dir=sys.argv[2])
store.commit("skill", (sys.argv[3],), sys.argv[4], {"name": sys.argv[3], "layers": [0], "default_layer": 0, "d_in": 64})
print("committed")
"""


@dataclass
class KilledCommit:
    returncode: int | None
    """The committing process's exit status (-9: SIGKILLed), None if it finished before it could be killed."""
    staged_files: int
    """Files of the artifact found in the store's private staging folder when it was killed."""
    staged_bytes: int
    """Bytes of the artifact written there by then (of `total_bytes`)."""
    total_bytes: int


def write_big_artifact(folder: Path, files: int = 8, mib_each: int = 16) -> int:
    """Files large enough that copying them into the store takes a while; returns the total size."""
    block = os.urandom(1 << 20)
    for i in range(files):
        path = folder / "sae" / f"layers.{i}" / "sae.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:
            for j in range(mib_each):
                fh.write(block[j:] + block[:j])
    return files * mib_each << 20


def kill_mid_commit(store_root: Path, cache_dir: Path, name: str, src: Path, total_bytes: int, timeout_s: float = 120) -> KilledCommit:
    """Run ArtifactStore.commit in a subprocess and SIGKILL it as soon as bytes of its files land in
    the store's staging folder (the copy is under way, the manifest not written)."""
    staging = store_root / ".staging"
    before = set(os.listdir(staging)) if staging.exists() else set()
    proc = subprocess.Popen(
        [sys.executable, "-c", COMMIT_CODE, f"file://{store_root}", str(cache_dir), name, str(src)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            new = [staging / d for d in (set(os.listdir(staging)) if staging.exists() else set()) - before]
            if any(f.stat().st_size for d in new for f in d.rglob("*") if f.is_file()):
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                staged = [f for d in new for f in d.rglob("*") if f.is_file()]
                return KilledCommit(proc.returncode, len(staged), sum(f.stat().st_size for f in staged), total_bytes)
            time.sleep(0.0005)
        proc.wait(timeout_s)
        return KilledCommit(None, 0, 0, total_bytes)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------- the outcome table


@dataclass
class Outcome:
    fault: str
    outcome: str
    data_lost: str = "none"


def outcome_table(outcomes: list[Outcome]) -> list[str]:
    rows = [("fault injected", "outcome", "data lost")] + [(o.fault, o.outcome, o.data_lost) for o in outcomes]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines
