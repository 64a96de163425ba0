"""`resa demo --quick`: the README's main job end to end on the bundled model (a smoke test)."""

import json
import os
import subprocess
import sys

import pytest

from resa_engine.arith import ArithmeticConfig, generate_arithmetic


def test_arithmetic_data_is_deterministic_verified_and_disjoint():
    train, test = generate_arithmetic(ArithmeticConfig(train_rows=300, test_rows=50, seed=7))
    assert (train, test) == generate_arithmetic(ArithmeticConfig(train_rows=300, test_rows=50, seed=7))
    assert len(train) == 300 and len(test) == 50
    assert not {r.question for r in train} & {r.question for r in test}
    for row in train + test:
        if row.question.startswith("What is "):
            assert str(eval(row.question[len("What is ") : -1])) == row.answer  # noqa: S307 - our own arithmetic


@pytest.mark.slow
def test_demo_quick_runs_end_to_end_over_http(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESA_")}
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "demo", "--quick", "--workdir", str(tmp_path / "work"), "--report-dir", str(tmp_path / "reports")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("base_acc", "source_acc", "resa_acc"):
        assert 0.0 <= figures[key] <= 1.0
    assert {"service start (model loaded)", "source: SFT LoRA (stand-in for RL)"} <= set(figures["stage_wall_s"])
    assert any(k.startswith("extract demo-resa") for k in figures["stage_wall_s"])
    assert any(k.startswith("tune demo-resa") for k in figures["stage_wall_s"])
    reports = sorted((tmp_path / "reports").iterdir())
    assert {p.suffix for p in reports} == {".md", ".png", ".json"}
    table = (tmp_path / "reports" / reports[0].name).with_suffix(".md").read_text()
    assert "| base (SmolLM2-135M) |" in table and "| stage | wall s | compute |" in table
    assert "activation tokens" in table and "questions" in table and "settings: layer 12, objective kl" in table
    assert reports[0].with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
