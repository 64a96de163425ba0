"""Job-layer test helpers: a small real task run by real workers, and worker process control.

`run_sleep` behaves like the real tasks where the job layer cares: it reports progress
through the engine's ProgressTracker, honours should_stop, checkpoints into its
deterministic staging folder (a rerun resumes), and commits a skill manifest-last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SLEEP_TASK = "tests._helpers_jobs:run_sleep"


def run_sleep(params: dict, ctx) -> dict:
    from resa_engine.progress import ProgressTracker

    name = params["name"]
    steps, delay = int(params.get("steps", 5)), float(params.get("delay_s", 0.1))
    folder = ctx.staging.folder("skill", name)
    ckpt = folder / "checkpoint.json"
    start = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    should_stop = None if params.get("ignore_stop") else ctx.should_stop  # a task that never checks
    tracker = ProgressTracker("sleep", steps, ctx.progress, should_stop, start_step=start, min_interval_s=0.0)
    for step in range(start, steps):
        time.sleep(delay)
        (folder / "weights.bin").write_bytes(os.urandom(64))
        ckpt.write_text(json.dumps({"step": step + 1}))
        tracker.update(step + 1, loss=1.0 / (step + 1))
    if params.get("fail"):
        raise ValueError(f"task {name} failed on purpose")
    if params.get("commit", True):
        out = folder / "out"
        out.mkdir(exist_ok=True)
        (out / "weights.bin").write_bytes((folder / "weights.bin").read_bytes())
        ctx.store.commit("skill", (name,), out, {"name": name, "layers": [0], "default_layer": 0, "d_in": 64})
        ctx.staging.clear("skill", name)
    return {"skill": name, "steps": steps, "resumed_from": start, "job_id": ctx.job_id, "allow_paths": ctx.allow_paths}


class WorkerProcess:
    """`resa worker` as a real subprocess against a real Redis."""

    def __init__(self, env: dict, log_path: Path):
        self.env, self.log_path, self.proc = env, log_path, None

    def start(self) -> "WorkerProcess":
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main(sys.argv[1:]))", "worker"],
            cwd=REPO,
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def wait_for(predicate, timeout_s: float = 60.0, interval_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
