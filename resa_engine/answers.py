"""Reading a completion's final answer and checking it against the verified one (math-verify).

The final answer is read as \\boxed{..}, else <answer>..</answer>, else "Answer: ..", else the last
number; equivalence is math-verify's (1,000 = 1000, \\frac{1}{2} = 0.5).
"""

from __future__ import annotations

import re
import threading


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
