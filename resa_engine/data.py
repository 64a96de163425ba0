"""Verified QA data: JSONL validation, the Resa trigger template, EOS-joined fixed-length chunks.

Rows carry a question (`question`, `problem` or `prompt`) and a verified `answer`; no
reasoning traces. Stage I and II see each row through the trigger template (paper §3,
authors' code), examples joined with EOS and cut into fixed-length chunks.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .errors import DatasetError

if TYPE_CHECKING:
    import torch

# The Resa system prompt, verbatim from the authors' code.
SYSTEM_PROMPT = (
    "\nA conversation between User and Assistant. The user asks a question, and the Assistant solves it.\n"
    "The assistant first thinks about the reasoning process in the mind and then provides the user\n"
    "with the answer. The reasoning process and answer are enclosed within <think> </think> and\n"
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think>\n"
    "<answer> answer here </answer>.\n"
)
QUESTION_FIELDS = ("question", "problem", "prompt")
AUTHORS_CHUNK_LEN = 2048
"""The authors' chunk length (Stage I and II); the default, capped at the model's context."""
MAX_DATASET_BYTES = 64 * 1024 * 1024
MAX_DATASET_ROWS = 200_000


@dataclass(frozen=True)
class QARow:
    question: str
    answer: str

    def to_json(self) -> str:
        return json.dumps({"question": self.question, "answer": self.answer}, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def resa_prompt(question: str) -> str:
    """The Resa prompt up to the assistant's turn (no chat template); evaluation continues from here."""
    return SYSTEM_PROMPT + f"User:\n {question}\n\nAssistant:\n"


def resa_completion(answer: str) -> str:
    """The trigger's assistant part: the verified answer stands in for the reasoning."""
    return f" <think> {answer} </think>\n<answer> Answer: {answer}</answer>"


def trigger_text(row: QARow) -> str:
    """The text that triggers the skill (paper §3): prompt + completion, no chat template."""
    return resa_prompt(row.question) + resa_completion(row.answer)


def chunk_len_for(context: int | None, requested: int | None = None) -> int:
    """The chunk length to use: the requested one, else the authors' 2048 capped at the model's context."""
    if requested is not None:
        return requested
    return min(AUTHORS_CHUNK_LEN, context) if context else AUTHORS_CHUNK_LEN


def _collect(numbered: Iterable[tuple[int, object]], problems: list, max_rows: int) -> list[QARow]:
    """Rows from (line number, decoded record) pairs; every problem is reported with its line number."""
    rows = []
    for lineno, record in numbered:
        if len(rows) >= max_rows:
            raise DatasetError(f"dataset has more than {max_rows} rows")
        row = _row_from_record(record, lineno, problems)
        if row is not None:
            rows.append(row)
    _raise_problems(problems)
    if not rows:
        raise DatasetError("dataset is empty: no rows")
    return rows


def parse_qa_rows(records: Iterable[object], *, first_line: int = 1, max_rows: int = MAX_DATASET_ROWS) -> list[QARow]:
    """Validate already-decoded rows (e.g. a JSON body's `rows`)."""
    return _collect(enumerate(records, start=first_line), [], max_rows)


def parse_qa_jsonl(data: bytes | str, *, max_bytes: int = MAX_DATASET_BYTES, max_rows: int = MAX_DATASET_ROWS) -> list[QARow]:
    """Parse and validate JSONL; every problem is reported with its line number."""
    if len(data) > max_bytes:
        raise DatasetError(f"dataset is {len(data)} bytes, over the limit of {max_bytes}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"dataset is not UTF-8 text (byte {exc.start})") from None
    problems: list = []

    def records():
        for lineno, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append((lineno, f"malformed JSON ({exc.msg} at column {exc.colno})"))
            except RecursionError:
                problems.append((lineno, "JSON nested too deeply"))

    return _collect(records(), problems, max_rows)


def load_qa_file(path: Path | str, **limits) -> list[QARow]:
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"dataset file {path} does not exist") from None
    except IsADirectoryError:
        raise DatasetError(f"dataset path {path} is a directory, not a JSONL file") from None
    try:
        return parse_qa_jsonl(data, **limits)
    except DatasetError as exc:
        raise DatasetError(f"{path}: {exc}", exc.problems) from None


def _row_from_record(record: object, lineno: int, problems: list[tuple[int, str]]) -> QARow | None:
    if not isinstance(record, dict):
        problems.append((lineno, "row must be a JSON object"))
        return None
    field = next((f for f in QUESTION_FIELDS if f in record), None)
    if field is None:
        problems.append((lineno, f"missing question field (one of {', '.join(QUESTION_FIELDS)})"))
        return None
    question, answer = record[field], record.get("answer")
    if not isinstance(question, str) or not question.strip():
        problems.append((lineno, f"`{field}` must be a non-empty string"))
        return None
    for name, value in ((field, question), ("answer", answer)):
        if isinstance(value, str) and not _is_unicode(value):
            problems.append((lineno, f"`{name}` contains a lone surrogate (not valid Unicode text)"))
            return None
    if answer is None:
        problems.append((lineno, "missing `answer`"))
        return None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        problems.append((lineno, "`answer` must be a string or a number"))
        return None
    answer = str(answer).strip()
    if not answer:
        problems.append((lineno, "`answer` is empty"))
        return None
    return QARow(question=question.strip(), answer=answer)


def _is_unicode(text: str) -> bool:
    """False for text holding a lone surrogate (JSON `"\\ud800"`): it cannot be encoded, tokenized or stored."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _raise_problems(problems: list[tuple[int, str]]) -> None:
    if problems:
        shown = "; ".join(f"line {n}: {msg}" for n, msg in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DatasetError(f"{len(problems)} invalid row(s): {shown}{more}", problems)


def rows_to_jsonl(rows: list[QARow]) -> bytes:
    """The normalized form: one canonical JSON object per line; what the store keeps and hashes."""
    return "".join(row.to_json() + "\n" for row in rows).encode("utf-8")


def dataset_sha256(rows: list[QARow]) -> str:
    return hashlib.sha256(rows_to_jsonl(rows)).hexdigest()


def split_rows(rows: list[QARow], heldout_fraction: float, seed: int) -> tuple[list[QARow], list[QARow]]:
    """Seeded row-level split, so held-out text never appears in training chunks."""
    if not 0 <= heldout_fraction < 1:
        raise DatasetError(f"held-out fraction must be in [0, 1), got {heldout_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_held = int(round(len(rows) * heldout_fraction))
    if heldout_fraction > 0 and len(rows) >= 2:
        n_held = max(1, min(n_held, len(rows) - 1))
    held = sorted(order[:n_held])
    train = sorted(order[n_held:])
    return [rows[i] for i in train], [rows[i] for i in held]


@dataclass
class TriggerDataset:
    """Trigger texts tokenized, joined with EOS and cut into [n_chunks, chunk_len] token ids."""

    chunks: torch.Tensor
    chunk_len: int
    n_rows: int

    @classmethod
    def from_rows(cls, rows: list[QARow], tokenizer, chunk_len: int, *, max_tokens: int | None = None) -> "TriggerDataset":
        if chunk_len < 2:
            raise DatasetError(f"chunk length must be at least 2 tokens, got {chunk_len}")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DatasetError("tokenizer has no EOS token to join examples with")
        encoded = tokenizer([trigger_text(r) for r in rows], add_special_tokens=False)["input_ids"]
        stream: list[int] = []
        for ids in encoded:
            stream.extend(ids)
            stream.append(eos)
            if max_tokens is not None and len(stream) >= max_tokens:
                break
        if max_tokens is not None:
            stream = stream[:max_tokens]
        n_chunks = len(stream) // chunk_len
        if n_chunks == 0:
            raise DatasetError(
                f"dataset too small: {len(stream)} tokens from {len(rows)} rows do not fill one chunk of {chunk_len} tokens"
            )
        import torch

        chunks = torch.tensor(stream[: n_chunks * chunk_len], dtype=torch.long).view(n_chunks, chunk_len)
        return cls(chunks=chunks, chunk_len=chunk_len, n_rows=len(rows))

    def __len__(self) -> int:
        return self.chunks.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.chunks.numel()

    def batches(self, batch_size: int, *, start: int = 0):
        """Consecutive batches of whole chunks from chunk index `start` (for resuming)."""
        for i in range(start, len(self), batch_size):
            yield i, self.chunks[i : i + batch_size]


def special_token_mask(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """True where a token is BOS/EOS/PAD: high-norm positions kept out of SAE training."""
    import torch

    specials = {t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None}
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for t in specials:
        mask |= input_ids == t
    return mask
