"""Evaluation: pass@1 on verified QA, base vs skill side by side (paper §4 protocol).

Prompt (the Resa format, the template the skill was extracted and tuned with, cut where the
model starts thinking):
  SYSTEM_PROMPT + "User:\\n {question}\\n\\nAssistant:\\n <think>"
With `prompt_format="chat"` a chat model gets the system prompt and question through its chat
template instead. Each question is sampled `samples` times (paper: temperature 0.6, top_p 0.95);
pass@1 is the mean correctness over all samples, with a 95% Wilson interval over them.
The final answer is read as \\boxed{..}, else <answer>..</answer>, else "Answer: ..", else the last
number, and checked against the verified answer with math-verify.
"""

from __future__ import annotations

import math
import re
import threading
import time
from dataclasses import asdict, dataclass, field

from .data import SYSTEM_PROMPT, QARow
from .progress import ProgressFn, ProgressTracker, StopFn
from .sampling import SamplingParams

PROMPT_FORMATS = ("resa", "chat")


def eval_prompt(question: str) -> str:
    """The Resa-format evaluation prompt, continued by the model from inside <think>."""
    return SYSTEM_PROMPT + f"User:\n {question}\n\nAssistant:\n <think>"


# ---------------------------------------------------------------- answers


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        rest = text[start:].split(None, 1)  # `\boxed 5`
        return rest[1].split()[0] if len(rest) > 1 and rest[1].split() else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None


_ANSWER_TAG = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.S)
_ANSWER_LINE = re.compile(r"answer\s*(?:is|:)\s*(.+)", re.I)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _clean(ans: str) -> str:
    ans = ans.strip().strip("$").strip()
    ans = re.sub(r"^\\text\{(.*)\}$", r"\1", ans)
    return ans.rstrip(".").strip()


def extract_answer(text: str) -> str | None:
    """The final answer of a completion, or None when it states none."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed:
        return _clean(boxed)
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = tags[-1].strip()
        line = _ANSWER_LINE.search(inner)
        inner = line.group(1) if line else inner
        if inner.strip():
            return _clean(inner.strip().splitlines()[0])
    lines = _ANSWER_LINE.findall(text)
    if lines and lines[-1].strip():
        return _clean(lines[-1])
    numbers = _NUMBER.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def _parse(expr: str):
    from math_verify import parse

    # signal-based timeouts only work on the main thread; elsewhere parse without one
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    got = parse(f"${expr}$", parsing_timeout=timeout)
    return got or parse(expr, parsing_timeout=timeout)


def is_correct(pred: str | None, gold: str) -> bool:
    """math-verify equivalence of a predicted answer and the verified one (1,000 = 1000, \\frac{1}{2} = 0.5)."""
    from math_verify import verify

    if pred is None or not str(pred).strip():
        return False
    pred, gold = str(pred).strip(), str(gold).strip()
    if pred == gold:
        return True
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold_p, pred_p = _parse(gold), _parse(pred)
        return bool(gold_p and pred_p and verify(gold_p, pred_p, timeout_seconds=timeout))
    except Exception:  # math-verify raises a zoo of sympy errors on odd input: that is a wrong answer
        return False


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion (sensible at 0, 1 and small n)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)  # exact ends, not 0.9999999999999999
    return (lo, hi)


def retention(base_acc: float, skill_acc: float, source_acc: float) -> float | None:
    """Share of the source's gain over the base that the skill transfers; None when the source gains nothing."""
    gain = source_acc - base_acc
    if abs(gain) < 1e-12:
        return None
    return (skill_acc - base_acc) / gain


# ---------------------------------------------------------------- evaluation


@dataclass
class EvalConfig:
    """Sampling protocol of an evaluation (defaults: the paper's temperature and top_p)."""

    samples: int = 4
    """Completions sampled per question; pass@1 averages over them."""
    temperature: float = 0.6
    """Sampling temperature (0: greedy, then one sample is enough)."""
    top_p: float = 0.95
    """Nucleus sampling mass."""
    max_tokens: int = 512
    """Most new tokens per completion."""
    seed: int = 0
    """Sample k of question q uses seed + q * samples + k: results do not depend on batching."""
    batch_size: int = 8
    """Sequences decoded together (left padding)."""
    prompt_format: str = "resa"
    """`resa` (plain Resa template) or `chat` (the tokenizer's chat template with the Resa system prompt)."""
    stop: list[str] = field(default_factory=lambda: ["</answer>", "\nUser:"])
    """Strings that end a completion early: the answer is complete, or the model starts the next
    user turn of the Resa template (what follows is not its answer to this question)."""

    def validate(self) -> None:
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be a positive integer, got {self.samples!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p)


@dataclass
class QuestionResult:
    question: str
    gold: str
    answers: list[str | None]
    """The extracted answer of every sample (None: none stated)."""
    correct: list[bool]
    completions: list[str] = field(default_factory=list)
    """The completion texts (kept only when asked for)."""

    @property
    def pass_rate(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0


@dataclass
class EvalReport:
    label: str
    """What was evaluated: `base`, `skill`, `source`."""
    model: str
    adapter: str | None
    """The attached adapter's name, None for the bare model."""
    correct: int
    total: int
    questions: list[QuestionResult]
    config: dict
    wall_s: float
    completion_tokens: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    def summary(self) -> dict:
        lo, hi = self.ci95
        return {
            "model": self.model,
            "adapter": self.adapter,
            "accuracy": self.accuracy,
            "ci95": [lo, hi],
            "correct": self.correct,
            "total": self.total,
            "questions": len(self.questions),
            "completion_tokens": self.completion_tokens,
            "wall_s": round(self.wall_s, 3),
        }


def _prompt_ids(tokenizer, question: str, prompt_format: str) -> list[int]:
    if prompt_format == "chat":
        from .generate import format_prompt

        ids = format_prompt(tokenizer, messages=[{"role": "system", "content": SYSTEM_PROMPT.strip()}, {"role": "user", "content": question}])
        return ids + tokenizer(" <think>", add_special_tokens=False)["input_ids"]
    return list(tokenizer(eval_prompt(question))["input_ids"])


def evaluate(
    model,
    tokenizer,
    rows: list[QARow],
    cfg: EvalConfig | None = None,
    *,
    adapter: str | None = None,
    label: str = "base",
    model_name: str = "",
    keep_text: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> EvalReport:
    """pass@1 of `model` (with the attached `adapter`, or bare) on verified QA rows."""
    from .generate import generate_batch

    cfg = cfg or EvalConfig()
    cfg.validate()
    if not rows:
        raise ValueError("nothing to evaluate: no rows")
    t0 = time.perf_counter()
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p, stop=list(cfg.stop))
    prompts = [_prompt_ids(tokenizer, r.question, cfg.prompt_format) for r in rows]
    # every (question, sample) pair, longest prompts first so batches carry little padding
    jobs = sorted(((q, k) for q in range(len(rows)) for k in range(cfg.samples)), key=lambda qk: (-len(prompts[qk[0]]), qk))
    results = [[None] * cfg.samples for _ in rows]
    tracker = ProgressTracker(f"eval:{label}", len(jobs), progress, should_stop)
    done = correct = tokens = 0
    for start in range(0, len(jobs), cfg.batch_size):
        batch = jobs[start : start + cfg.batch_size]
        seeds = [cfg.seed + q * cfg.samples + k for q, k in batch]
        outs = generate_batch(model, tokenizer, [prompts[q] for q, _ in batch], params, adapter=adapter, seeds=seeds)
        for (q, k), out in zip(batch, outs):
            answer = extract_answer(out.text)
            ok = is_correct(answer, rows[q].answer)
            results[q][k] = (answer, ok, out.text)
            correct += ok
            tokens += out.usage.completion_tokens
        done += len(batch)
        tracker.update(done, accuracy=correct / done)
    questions = [
        QuestionResult(
            question=row.question,
            gold=row.answer,
            answers=[a for a, _, _ in res],
            correct=[ok for _, ok, _ in res],
            completions=[t for _, _, t in res] if keep_text else [],
        )
        for row, res in zip(rows, results)
    ]
    return EvalReport(
        label=label,
        model=model_name,
        adapter=adapter,
        correct=correct,
        total=len(jobs),
        questions=questions,
        config=asdict(cfg),
        wall_s=time.perf_counter() - t0,
        completion_tokens=tokens,
    )


def compare(base: EvalReport, skill: EvalReport | None = None, source: EvalReport | None = None) -> dict:
    """Base, skill and source side by side: accuracies with intervals, delta, retention, per question."""
    reports = {r.label: r for r in (base, skill, source) if r is not None}
    out: dict = {name: rep.summary() for name, rep in reports.items()}
    out["delta"] = (skill.accuracy - base.accuracy) if skill else None
    out["retention"] = retention(base.accuracy, skill.accuracy, source.accuracy) if (skill and source) else None
    questions = []
    for i, q in enumerate(base.questions):
        entry = {"question": q.question, "answer": q.gold}
        for name, rep in reports.items():
            qr = rep.questions[i]
            entry[name] = {"pass_rate": qr.pass_rate, "answers": qr.answers, "correct": qr.correct}
            if qr.completions:
                entry[name]["completions"] = qr.completions
        questions.append(entry)
    out["questions"] = questions
    return out
