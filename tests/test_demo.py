"""`resa demo --quick`: the README's main job end to end on the bundled model (a smoke test), its
recovery when its server stops mid-job, and its resumption when run again with the same settings."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from _helpers_jobs import REPO, wait_for
from conftest import _real_model_cache
from resa_engine.arith import ArithmeticConfig, generate_arithmetic


def test_arithmetic_data_is_deterministic_verified_and_disjoint():
    train, test = generate_arithmetic(ArithmeticConfig(train_rows=300, test_rows=50, seed=7))
    assert (train, test) == generate_arithmetic(ArithmeticConfig(train_rows=300, test_rows=50, seed=7))
    assert len(train) == 300 and len(test) == 50
    assert not {r.question for r in train} & {r.question for r in test}
    for row in train + test:
        if row.question.startswith("What is "):
            assert str(eval(row.question[len("What is ") : -1])) == row.answer  # noqa: S307 - our own arithmetic


class DemoRun:
    """`resa demo` as a subprocess whose stderr is read as it comes."""

    def __init__(self, args: list[str], env: dict):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "demo", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.err: list[str] = []
        self.out = ""
        self._readers = [threading.Thread(target=self._read_err, daemon=True), threading.Thread(target=self._read_out, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            self.err.append(line)

    def _read_out(self) -> None:
        self.out = self.proc.stdout.read()

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def find(self, pattern: str):
        return next((m for m in map(re.compile(pattern).search, list(self.err)) if m), None)

    def wait(self, timeout_s: float) -> int:
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        for t in self._readers:
            t.join(10)
        return code

    def stop(self) -> None:
        """SIGTERM (its server gets SIGTERM too when it dies), then SIGKILL."""
        from app.local.embedded import stop_process

        stop_process(self.proc, 30)

    def serve_pid(self) -> int:
        import psutil

        (serve,) = [c for c in psutil.Process(self.proc.pid).children() if "serve" in c.cmdline()]
        return serve.pid


def _job_making_progress(port: int) -> dict | None:
    try:
        jobs = httpx.get(f"http://127.0.0.1:{port}/jobs", params={"state": "started"}, timeout=5).json()["jobs"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return next((j for j in jobs if j["kind"] in ("extract", "tune") and (j.get("progress") or {}).get("step", 0) > 0), None)


@pytest.fixture
def demo_env(tmp_path):
    """No RESA_* setting but a private cache dir (staging checkpoints, embedded Redis data) that shares
    the converted SmolLM2 weights of the user's cache."""
    cache = tmp_path / "cache"
    cache.mkdir()
    real = _real_model_cache(tmp_path / "model-cache")
    (real / "models").mkdir(parents=True, exist_ok=True)
    (cache / "models").symlink_to(real / "models", target_is_directory=True)
    if (real / "hashes.json").exists():
        shutil.copy(real / "hashes.json", cache / "hashes.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESA_")}
    env["RESA_CACHE_DIR"] = str(cache)
    return env


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_over_http_survives_a_server_stop_and_resumes(tmp_path, demo_env):
    work, reports = tmp_path / "work", tmp_path / "reports"
    args = ["--quick", "--workdir", str(work), "--report-dir", str(reports)]

    # First run. While a job makes progress its `resa serve` is stopped under it: the demo starts it again
    # on the same port (same embedded Redis data), the job resumes from its checkpoint, the demo goes on.
    first = DemoRun(args, demo_env)
    try:
        match = wait_for(lambda: first.find(r"starting `resa serve` on 127\.0\.0\.1:(\d+)") or first.proc.poll() is not None, 120, 0.2, "the port")
        assert first.proc.poll() is None, first.stderr[-3000:]
        port = int(match.group(1))
        job = wait_for(lambda: _job_making_progress(port) or first.proc.poll() is not None, 1200, 1.0, "a job making progress")
        assert first.proc.poll() is None, first.stderr[-3000:]
        os.kill(first.serve_pid(), signal.SIGTERM)
        assert first.wait(1200) == 0, first.stderr[-3000:]
    finally:
        first.stop()
        print("".join(line for line in first.err if line.startswith("[demo]")))
    assert f"[demo] `resa serve` stopped (status 0); starting it again on port {port} (restart 1 of 3)" in first.stderr, first.stderr[-3000:]
    assert "Traceback" not in first.stderr

    figures = json.loads(first.out.strip().splitlines()[-1])
    for key in ("base_acc", "source_acc", "resa_acc"):
        assert 0.0 <= figures[key] <= 1.0
    assert set(figures["arms"]) == {"base", "source", "resa", "sae_kept", "random_sae"}
    assert figures["arms"]["resa"]["acc"] == figures["resa_acc"] and figures["arms"]["base"]["diff_vs_base"] is None
    for key in ("source", "resa", "sae_kept", "random_sae"):
        arm = figures["arms"][key]
        lo, hi = arm["diff_ci95"]
        assert lo <= arm["diff_vs_base"] <= hi and abs(arm["diff_vs_base"] - (arm["acc"] - figures["base_acc"])) < 1e-9
        assert 0.0 <= arm["mcnemar_p"] <= 1.0
    assert any(k.startswith("control: tune demo-resa.random-sae") for k in figures["stage_wall_s"])
    assert {"service start (model loaded)", "source: SFT LoRA (stand-in for RL)"} <= set(figures["stage_wall_s"])
    assert any(k.startswith("extract demo-resa") for k in figures["stage_wall_s"])
    assert any(k.startswith("tune demo-resa") for k in figures["stage_wall_s"])
    (md,) = reports.glob("*.md")
    assert {p.suffix for p in reports.iterdir()} == {".md", ".png", ".json"}
    assert re.fullmatch(rf"demo-\d{{8}}-\d{{6}}-{first.proc.pid}\.md", md.name), md.name  # timestamp and pid
    table = md.read_text()
    assert table.startswith("# Transfer report: skill `demo-resa`") and "## Verdict" in table and "| stage | wall s | compute |" in table
    assert "`random_sae`" in table and "`sae_kept`" in table and "SFT" in table  # every arm, and which source was used
    assert "activation tokens" in table and "questions" in table and "settings: layer 12, objective kl" in table
    assert md.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stages = {s["name"]: s["detail"] for s in json.loads(md.with_suffix(".json").read_text())["stages"]}
    if job["kind"] == "extract":
        assert stages["extract demo-resa (layer 12)"].get("resumed") is True, stages
    assert not any(d.get("reused") for d in stages.values()), stages
    (store,) = work.glob("store-*/")
    assert not (tmp_path / "cache" / "redis" / f"127.0.0.1-{port}").exists()  # a finished run's Redis data is removed

    # Second run, same settings: the same store; the source adapter, the skill, the adapter and the
    # eval report are all reused, so only the service start costs anything.
    t = time.monotonic()
    second = DemoRun(args, demo_env)
    try:
        assert second.wait(900) == 0, second.stderr[-3000:]
    finally:
        second.stop()
        print("".join(line for line in second.err if line.startswith("[demo]")))
    second_s = time.monotonic() - t
    assert "Traceback" not in second.stderr and "starting it again" not in second.stderr
    for stage in ("source: SFT LoRA (stand-in for RL)", "extract demo-resa (layer 12)", "tune demo-resa -> smollm2-135m",
                  "control: tune demo-resa.random-sae -> smollm2-135m", "eval base + source + resa + sae_kept + random_sae"):
        assert f"[demo] skip {stage}:" in second.stderr, (stage, second.stderr[-3000:])
    again = json.loads(second.out.strip().splitlines()[-1])
    assert {k: again[k] for k in ("base_acc", "source_acc", "resa_acc")} == {k: figures[k] for k in ("base_acc", "source_acc", "resa_acc")}
    assert set(again["stage_wall_s"]) == set(figures["stage_wall_s"])
    assert set(work.glob("store-*/")) == {store}
    (md2,) = set(reports.glob("*.md")) - {md}
    summary = json.loads(md2.with_suffix(".json").read_text())
    reused = [name for name, work_text in summary["stage_work"].items() if work_text.startswith("reused: ")]
    assert set(reused) == set(summary["stage_wall_s"]) - {"service start (model loaded)"}, summary["stage_work"]
    print(f"second run (everything reused): {second_s:.1f} s")
