"""Evaluation: answer extraction and checking, pass@1 through the engine (arms side by side, batched), paired statistics."""

from __future__ import annotations

import json

import pytest
from _helpers_tune import make_skill
from conftest import arithmetic_rows, write_jsonl

from resa_engine.answers import extract_answer, is_correct
from resa_engine.data import QARow
from resa_engine.engine import EngineConfig
from resa_engine.engine.native import Scheduler
from resa_engine.evaluate import Arm, EvalConfig, EvalReport, QuestionResult, compare, eval_prompt, evaluate
from resa_engine.stats import wilson_interval


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "text,gold,extracted,ok",
    [
        ("so the total is \\boxed{42}.", "42", "42", True),
        ("<think> 3 of 4 </think>\n<answer> Answer: 3/4</answer>", "0.75", "3/4", True),
        ("<answer> Answer: 3/4</answer>", "3/4", "3/4", True),
        ("Answer: 1,000", "1000", "1,000", True),
        ("\\boxed{1,000}", "1000", "1,000", True),
        ("<answer> Answer: \\frac{1}{2}</answer>", "0.5", "\\frac{1}{2}", True),
        ("<answer>\\dfrac{3}{4}</answer>", "0.75", "\\dfrac{3}{4}", True),
        ("we get x = -7", "-7", "-7", True),
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", True),
        ("$\\boxed{x^2+1}$", "1+x^2", "x^2+1", True),
        ("Answer: $\\pi$", "\\pi", "\\pi", True),
        ("The answer is 2.50.", "2.5", "2.50", True),
        ("<answer> Answer: 5", "5", "5", True),  # generation stopped at </answer>
        ("first 3, then 4, finally 10", "10", "10", True),
        ("<answer> Answer: 41</answer>", "42", "41", False),
        ("\\boxed{7}", "-7", "7", False),
        ("answer: 0.333", "1/3", "0.333", False),
        ("Answer: 3/4", "4/3", "3/4", False),
        ("no numbers here", "5", None, False),
        ("", "5", None, False),
    ],
)
def test_answer_extraction_and_checking(text, gold, extracted, ok):
    assert extract_answer(text) == extracted
    assert is_correct(extract_answer(text), gold) is ok


def _report(label: str, correct: list[bool]) -> EvalReport:
    questions = [QuestionResult(f"q{i}", "1", ["1" if c else "0"], [c]) for i, c in enumerate(correct)]
    return EvalReport(label, "m", None, sum(correct), len(correct), questions, {}, 0.0)


def test_compare_pairs_every_arm_with_the_base_and_reports_retention_only_when_defined():
    n = 100
    base = [False] * n
    source = [i < 40 for i in range(n)]  # fixes 40 questions
    skill = [i < 30 for i in range(n)]  # fixes 30 of the same ones
    same = list(base)
    out = compare({"base": _report("base", base), "source": _report("source", source), "skill": _report("skill", skill), "same": _report("same", same)})
    arms = out["arms"]
    assert arms["skill"]["diff_vs_base"] == pytest.approx(0.30) and arms["skill"]["gained"] == 30 and arms["skill"]["lost"] == 0
    assert arms["skill"]["mcnemar_p"] == pytest.approx(2 * 0.5**30)
    lo, hi = arms["skill"]["diff_ci95"]
    assert 0 < lo < 0.30 < hi < 1
    assert arms["skill"]["retention"]["defined"] and arms["skill"]["retention"]["value"] == pytest.approx(0.75)
    assert out["delta"] == pytest.approx(0.30) and out["retention"] == pytest.approx(0.75)
    assert arms["same"]["diff_vs_base"] == 0 and arms["same"]["diff_ci95"] == [0.0, 0.0] and arms["same"]["mcnemar_p"] == 1.0
    assert "diff_vs_base" not in arms["base"] and arms["base"]["acc"] == 0.0
    assert out["base"]["ci95"] == list(wilson_interval(0, n))

    # a source no better than the base: retention is undefined, with the reason, not a ratio of noise
    flat = compare({"base": _report("base", base), "source": _report("source", same), "skill": _report("skill", skill)})
    ret = flat["arms"]["skill"]["retention"]
    assert ret["value"] is None and not ret["defined"] and "contains 0" in ret["reason"] and flat["retention"] is None


def test_eval_prompt_is_the_resa_format():
    p = eval_prompt("What is 2 + 2?")
    assert p.startswith("\nA conversation between User and Assistant.")
    assert p.endswith("User:\n What is 2 + 2?\n\nAssistant:\n <think>")


@pytest.fixture(scope="module")
def engines(tiny_llama):
    """The session's tiny Llama served by two engines: one row at a time, and batches of 8."""
    one = Scheduler(tiny_llama, config=EngineConfig(max_batch=1)).start()
    many = Scheduler(tiny_llama, config=EngineConfig(max_batch=8, max_queue=4)).start()
    yield one, many
    one.stop()
    many.stop()


def _eval(engine, rows, cfg, **kw):
    return evaluate(rows, [Arm("base", engine)], cfg, **kw)["base"]


def test_evaluate_is_batched_deterministic_and_scores_what_it_extracts(engines):
    one_engine, many_engine = engines
    rows = arithmetic_rows(6, seed=4)
    hot = EvalConfig(samples=1, temperature=1.0, top_p=1.0, max_tokens=16, stop=[])
    one = _eval(one_engine, rows, hot, keep_text=True)
    many = _eval(many_engine, rows, hot, keep_text=True)  # a queue of 4: the evaluation waits for room, loses nothing
    assert [q.completions for q in one.questions] == [q.completions for q in many.questions]  # batching changes nothing

    # gold = what the model said -> exactly the answered samples count as correct
    said = [q.answers[0] for q in one.questions]
    answered = sum(a is not None for a in said)
    assert answered, "a random tiny model at temperature 1 states some number in 16 tokens"
    echo = [QARow(r.question, a if a is not None else "123456789") for r, a in zip(rows, said)]
    report = _eval(many_engine, echo, hot)
    assert report.correct == answered and report.total == len(rows)
    assert [q.correct[0] for q in report.questions] == [a is not None for a in said]

    sampled = EvalConfig(samples=3, max_tokens=6)
    events = []
    a = _eval(many_engine, rows, sampled, progress=events.append, keep_text=True)
    b = _eval(one_engine, rows, sampled)
    assert a.total == 18 and all(len(q.answers) == 3 and len(q.completions) == 3 for q in a.questions)
    assert [q.answers for q in a.questions] == [q.answers for q in b.questions]
    assert events[-1].stage == "eval" and events[-1].step == events[-1].total == 18
    assert (a.config["temperature"], a.config["top_p"]) == (0.6, 0.95)  # the paper's protocol by default


def test_compare_puts_base_skill_and_source_side_by_side(engines):
    rows = arithmetic_rows(2, seed=1)
    cfg = EvalConfig(samples=2, max_tokens=4)
    reports = evaluate(rows, [Arm("base", engines[1])], cfg)
    assert reports["base"].model == "tiny-llama"
    out = compare(reports)
    assert out["base"]["total"] == 4 and out["delta"] is None and out["retention"] is None
    assert len(out["questions"]) == 2 and set(out["questions"][0]) == {"question", "answer", "base"}
    lo, hi = out["base"]["ci95"]
    assert 0 <= lo <= out["base"]["accuracy"] <= hi <= 1


def test_bad_eval_config_is_refused(engines):
    for cfg, message in [(EvalConfig(samples=0), "samples"), (EvalConfig(top_p=0), "top_p"), (EvalConfig(prompt_format="x"), "prompt_format")]:
        with pytest.raises(ValueError, match=message):
            evaluate(arithmetic_rows(1), [Arm("base", engines[0])], cfg)


# ---------------------------------------------------------------- task and CLI


def test_cli_eval_end_to_end_base_vs_skill_with_retention(resa_env, store, tmp_path, capsys):
    from app.cli import main

    make_skill(store, "arith", tmp_path / "skill", rows=arithmetic_rows(30))
    assert main(["tune", "--skill", "arith", "--target", "tiny-llama", "--lr", "1e-3", "--max-steps", "2", "--chunk-len", "64", "--json"]) == 0
    capsys.readouterr()
    data = write_jsonl(tmp_path / "qa.jsonl", arithmetic_rows(5, seed=2))
    argv = ["eval", "--model", "tiny-llama", "--skill", "arith", "--data", str(data), "--samples", "2", "--max-tokens", "5", "--limit", "3"]
    assert main(argv + ["--source-model", "tiny-llama-b", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "tiny-llama" and report["dataset"]["rows"] == 5 and report["dataset"]["evaluated"] == 3
    assert report["base"]["total"] == report["skill"]["total"] == report["source"]["total"] == 6
    assert report["base"]["adapter"] is None and report["skill"]["adapter"] == "arith" and report["source"]["model"] == "tiny-llama-b"
    assert report["adapter"] == {"target": "tiny-llama", "skill": "arith", "cross_model": False} and report["cross_model"] is False
    assert report["delta"] == pytest.approx(report["skill"]["accuracy"] - report["base"]["accuracy"])
    assert "retention" in report and report["protocol"]["samples"] == 2 and report["protocol"]["temperature"] == 0.6
    q = report["questions"][0]
    assert set(q) == {"question", "answer", "base", "skill", "source"} and len(q["skill"]["answers"]) == 2

    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "PASS@1" in table and "base" in table and "skill" in table and "3 questions x 2 samples" in table

    assert main(argv + ["--control", "base", "--control", "resa", "--control", "sae_kept"]) == 0  # arms by name, the SAE kept too
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in table[1:-1]] == ["base", "skill", "sae_kept"] and "VS BASE" in table[0]
    assert "p=" in table[2] and "p=" in table[3]
    assert main(argv + ["--control", "random_sae"]) == 2  # its adapter is not built: one line, nothing run
    assert "arith.random-sae" in capsys.readouterr().err


def test_cli_eval_bad_input_exits_2_and_writes_nothing(resa_env, store, tmp_path, capsys):
    from app.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n{"answer": "3"}\n')
    good = write_jsonl(tmp_path / "qa.jsonl", arithmetic_rows(2))
    for argv, message in [
        (["eval", "--model", "tiny-llama", "--data", str(bad)], "line 2: missing question field"),
        (["eval", "--model", "tiny-llama", "--data", str(tmp_path / "none.jsonl")], "does not exist"),
        (["eval", "--model", "tiny-llama", "--data", str(good), "--samples", "0"], "samples"),
        (["eval", "--model", "tiny-llama", "--data", str(good), "--source-skill", "x"], "--source-skill needs --source-model"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("resa eval: error:") and message in err, err
    assert store.list_datasets() == []
    assert main(["eval", "--model", "tiny-llama", "--skill", "nope", "--data", str(good), "--max-tokens", "2"]) == 2
    assert "not found" in capsys.readouterr().err
