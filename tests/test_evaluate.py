"""Evaluation: answer extraction and checking, Wilson intervals, batched pass@1, base vs skill side by side."""

from __future__ import annotations

import json

import pytest
from _helpers_tune import make_skill
from conftest import arithmetic_rows, write_jsonl

from resa_engine.data import QARow
from resa_engine.evaluate import EvalConfig, compare, eval_prompt, evaluate, extract_answer, is_correct, retention, wilson_interval


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


def test_wilson_interval_and_retention():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == 1.0
    assert retention(0.2, 0.5, 0.6) == pytest.approx(0.75)
    assert retention(0.3, 0.3, 0.3) is None


def test_eval_prompt_is_the_resa_format():
    p = eval_prompt("What is 2 + 2?")
    assert p.startswith("\nA conversation between User and Assistant.")
    assert p.endswith("User:\n What is 2 + 2?\n\nAssistant:\n <think>")


def test_evaluate_is_batched_deterministic_and_scores_what_it_extracts(tiny_llama):
    rows = arithmetic_rows(6, seed=4)
    hot = EvalConfig(samples=1, temperature=1.0, top_p=1.0, max_tokens=16, batch_size=1, stop=[])
    one = evaluate(tiny_llama.model, tiny_llama.tokenizer, rows, hot, keep_text=True)
    many = evaluate(tiny_llama.model, tiny_llama.tokenizer, rows, EvalConfig(**{**hot.__dict__, "batch_size": 8}), keep_text=True)
    assert [q.completions for q in one.questions] == [q.completions for q in many.questions]  # left padding changes nothing

    # gold = what the model said -> exactly the answered samples count as correct
    said = [q.answers[0] for q in one.questions]
    answered = sum(a is not None for a in said)
    assert answered, "a random tiny model at temperature 1 states some number in 16 tokens"
    echo = [QARow(r.question, a if a is not None else "123456789") for r, a in zip(rows, said)]
    report = evaluate(tiny_llama.model, tiny_llama.tokenizer, echo, hot)
    assert report.correct == answered and report.total == len(rows)
    assert [q.correct[0] for q in report.questions] == [a is not None for a in said]

    sampled = EvalConfig(samples=3, max_tokens=6, batch_size=4)
    events = []
    a = evaluate(tiny_llama.model, tiny_llama.tokenizer, rows, sampled, progress=events.append, keep_text=True)
    b = evaluate(tiny_llama.model, tiny_llama.tokenizer, rows, sampled)
    assert a.total == 18 and all(len(q.answers) == 3 and len(q.completions) == 3 for q in a.questions)
    assert [q.answers for q in a.questions] == [q.answers for q in b.questions]
    assert events[-1].stage == "eval:base" and events[-1].step == events[-1].total == 18
    assert (a.config["temperature"], a.config["top_p"]) == (0.6, 0.95)  # the paper's protocol by default


def test_compare_puts_base_skill_and_source_side_by_side(tiny_llama):
    rows = arithmetic_rows(2, seed=1)
    cfg = EvalConfig(samples=2, max_tokens=4)
    base = evaluate(tiny_llama.model, tiny_llama.tokenizer, rows, cfg, label="base", model_name="tiny-llama")
    out = compare(base)
    assert out["base"]["total"] == 4 and out["delta"] is None and out["retention"] is None
    assert len(out["questions"]) == 2 and set(out["questions"][0]) == {"question", "answer", "base"}
    lo, hi = out["base"]["ci95"]
    assert 0 <= lo <= out["base"]["accuracy"] <= hi <= 1


def test_bad_eval_config_is_refused(tiny_llama):
    for cfg, message in [(EvalConfig(samples=0), "samples"), (EvalConfig(top_p=0), "top_p"), (EvalConfig(prompt_format="x"), "prompt_format")]:
        with pytest.raises(ValueError, match=message):
            evaluate(tiny_llama.model, tiny_llama.tokenizer, arithmetic_rows(1), cfg)


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
