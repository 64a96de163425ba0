"""Evaluation: pass@1 on verified QA for several arms side by side, through the generation engines
(paper §4 protocol).

An arm is a served model plus optionally an adapter and an SAE kept at inference (base, source,
Resa, controls). Every arm answers the same questions with the same seeds: sample k of question q
uses seed + q * samples + k in every arm, so answers are paired across arms (stats.py). All arms'
requests go to the engines at once and continuous batching schedules them together, adapters
mixed in one batch.

Prompt (the Resa format, the template the skill was extracted and tuned with, cut where the model
starts thinking): SYSTEM_PROMPT + "User:\\n {question}\\n\\nAssistant:\\n <think>". With
`prompt_format="chat"` a chat model gets the system prompt and question through its chat template.
Sampling defaults are the paper's (temperature 0.6, top_p 0.95).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from .answers import extract_answer, is_correct
from .data import SYSTEM_PROMPT, QARow
from .engine.text import format_prompt
from .errors import Cancelled, QueueFull
from .progress import ProgressFn, ProgressTracker, StopFn
from .sampling import SamplingParams
from .stats import paired_comparison, retention, wilson_interval

PROMPT_FORMATS = ("resa", "chat")
WAIT_POLL_S = 0.5


def eval_prompt(question: str) -> str:
    """The Resa-format evaluation prompt, continued by the model from inside <think>."""
    return SYSTEM_PROMPT + f"User:\n {question}\n\nAssistant:\n <think>"


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
    """Sample k of question q uses seed + q * samples + k, in every arm: results are paired and do not depend on batching."""
    batch_size: int = 32
    """Sequences the evaluation's own engine decodes together (its max_batch)."""
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
        self.params(0)

    def params(self, seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, seed=seed, stop=list(self.stop))


@dataclass
class Arm:
    """One evaluated configuration: an engine (a served model), optionally an adapter and an SAE."""

    label: str
    """How the report names it: `base`, `skill`, `source`, `sae_kept`, `random_sae`, ..."""
    engine: Any
    """The engine serving the arm's model (engine/protocol.py)."""
    adapter: str | None = None
    """Adapter key the engine's loader resolves; None: the bare model."""
    sae: Any = None
    """An SAE kept at inference for every request (sae.splice.SaeSplice); None: none."""
    describe: dict = field(default_factory=dict)
    """What the report says about the arm (adapter reference, SAE spec, cross-model, ...)."""


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
    """What was evaluated: `base`, `skill`, `source`, ..."""
    model: str
    adapter: str | None
    """The arm's adapter key, None for the bare model."""
    correct: int
    total: int
    questions: list[QuestionResult]
    config: dict
    wall_s: float
    completion_tokens: int = 0
    describe: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.total)

    @property
    def table(self) -> list[list[bool]]:
        """correct[q][k], for the paired statistics."""
        return [q.correct for q in self.questions]

    def summary(self) -> dict:
        lo, hi = self.ci95
        return {
            "model": self.model,
            "adapter": self.adapter,
            **self.describe,
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
        ids = format_prompt(tokenizer, messages=[{"role": "system", "content": SYSTEM_PROMPT.strip()}, {"role": "user", "content": question}])
        return ids + tokenizer(" <think>", add_special_tokens=False)["input_ids"]
    return list(tokenizer(eval_prompt(question))["input_ids"])


def evaluate(
    rows: list[QARow],
    arms: list[Arm],
    cfg: EvalConfig | None = None,
    *,
    keep_text: bool = False,
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> dict[str, EvalReport]:
    """pass@1 of every arm on verified QA rows, all arms' requests interleaved on their engines."""
    cfg = cfg or EvalConfig()
    cfg.validate()
    if not rows:
        raise ValueError("nothing to evaluate: no rows")
    if not arms or len({a.label for a in arms}) != len(arms):
        raise ValueError("evaluate needs at least one arm, each with its own label")
    t0 = time.perf_counter()
    prompts: dict[int, list[list[int]]] = {}
    for arm in arms:  # one tokenization per engine, shared by its arms
        if id(arm.engine) not in prompts:
            prompts[id(arm.engine)] = [_prompt_ids(arm.engine.tokenizer, r.question, cfg.prompt_format) for r in rows]
    # Question-major, arms innermost: the arms' requests for a question share batches (mixed adapters).
    pending = deque((a, q, k) for q in range(len(rows)) for k in range(cfg.samples) for a in range(len(arms)))
    results: list[list[list]] = [[[None] * cfg.samples for _ in rows] for _ in arms]
    tokens = [0] * len(arms)
    inflight: deque = deque()
    tracker = ProgressTracker("eval", len(pending), progress, should_stop)
    done = correct = 0
    try:
        while pending or inflight:
            while pending:  # fill the engines' queues; a full queue waits for the oldest request
                a, q, k = pending[0]
                arm = arms[a]
                try:
                    handle = arm.engine.submit(prompts[id(arm.engine)][q], cfg.params(cfg.seed + q * cfg.samples + k), arm.adapter, sae=arm.sae)
                except QueueFull:
                    if not inflight:
                        raise
                    break
                pending.popleft()
                inflight.append(((a, q, k), handle))
            (a, q, k), handle = inflight.popleft()
            out = _wait(handle, tracker)
            answer = extract_answer(out.text)
            ok = is_correct(answer, rows[q].answer)
            results[a][q][k] = (answer, ok, out.text)
            tokens[a] += out.usage.completion_tokens
            done += 1
            correct += ok
            tracker.update(done, accuracy=correct / done)
    except BaseException:
        for _, handle in inflight:
            handle.cancel()
        raise
    wall = time.perf_counter() - t0
    reports = {}
    for a, arm in enumerate(arms):
        questions = [
            QuestionResult(
                question=row.question,
                gold=row.answer,
                answers=[r[0] for r in res],
                correct=[r[1] for r in res],
                completions=[r[2] for r in res] if keep_text else [],
            )
            for row, res in zip(rows, results[a])
        ]
        reports[arm.label] = EvalReport(
            label=arm.label,
            model=arm.engine.name,
            adapter=arm.adapter,
            correct=sum(sum(q.correct) for q in questions),
            total=len(rows) * cfg.samples,
            questions=questions,
            config=asdict(cfg),
            wall_s=wall,
            completion_tokens=tokens[a],
            describe=dict(arm.describe),
        )
    return reports


def _wait(handle, tracker: ProgressTracker):
    """The handle's Completion, checking for cancellation while waiting."""
    while True:
        try:
            return handle.result(timeout=WAIT_POLL_S)
        except TimeoutError:
            if tracker.should_stop is not None and tracker.should_stop():
                raise Cancelled(f"evaluation cancelled at {tracker.stage}") from None


def compare(reports: dict[str, EvalReport], *, base: str = "base", source: str = "source", skill: str = "skill", n_boot: int = 10_000, seed: int = 0) -> dict:
    """Every arm's summary, and every arm against the base paired on the same questions: the difference
    in pass@1 with a paired bootstrap 95% interval and an exact McNemar p-value. Retention of each arm
    (gain over base / the source's gain) when a source arm is present, undefined when the source's own
    gain is indistinguishable from 0. `delta` and `retention` are the `skill` arm's, per question too."""
    out: dict = {label: rep.summary() for label, rep in reports.items()}
    base_rep = reports.get(base)
    arms: dict[str, dict] = {}
    for label, rep in reports.items():
        entry = {"acc": rep.accuracy, "ci95": list(rep.ci95), "n": rep.total, **rep.describe}
        if base_rep is not None and label != base:
            pc = paired_comparison(base_rep.table, rep.table, n_boot=n_boot, seed=seed)
            entry.update(diff_vs_base=pc.diff, diff_ci95=list(pc.ci95), mcnemar_p=pc.mcnemar_p, gained=pc.gained, lost=pc.lost)
            if source in reports and label != source:
                ret = retention(base_rep.table, reports[source].table, rep.table, n_boot=n_boot, seed=seed)
                entry["retention"] = {"value": ret.value, "ci95": list(ret.ci95) if ret.ci95 else None, "defined": ret.defined, "reason": ret.reason}
        arms[label] = entry
    out["arms"] = arms
    skill_arm = arms.get(skill) or {}
    out["delta"] = skill_arm.get("diff_vs_base")
    out["retention"] = (skill_arm.get("retention") or {}).get("value")
    questions = []
    first = next(iter(reports.values()))
    for i, q in enumerate(first.questions):
        entry = {"question": q.question, "answer": q.gold}
        for label, rep in reports.items():
            qr = rep.questions[i]
            entry[label] = {"pass_rate": qr.pass_rate, "answers": qr.answers, "correct": qr.correct}
            if qr.completions:
                entry[label]["completions"] = qr.completions
        questions.append(entry)
    out["questions"] = questions
    return out
