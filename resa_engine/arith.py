"""A deterministic generator of verified arithmetic and word-problem QA (the demo's data).

Every answer is computed, so the data are verified by construction; train and test
splits come from disjoint question sets, so held-out evaluation never sees a training
question. No downloads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .data import QARow

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jun", "Kofi", "Lena"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards"]


@dataclass
class ArithmeticConfig:
    train_rows: int = 2000
    """Rows in the training split."""
    test_rows: int = 100
    """Rows in the held-out test split."""
    seed: int = 0
    """Same seed, same rows."""
    max_operand: int = 50
    """Largest operand of additions and subtractions."""
    word_problem_fraction: float = 0.4
    """Share of rows phrased as one-step word problems."""


def _expression(rng: random.Random, cfg: ArithmeticConfig) -> QARow:
    kind = rng.choice(["add", "add", "sub", "mul"])
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return QARow(f"What is {a} * {b}?", str(a * b))
    a, b = rng.randint(1, cfg.max_operand), rng.randint(1, cfg.max_operand)
    if kind == "sub":
        a, b = max(a, b), min(a, b)
        return QARow(f"What is {a} - {b}?", str(a - b))
    return QARow(f"What is {a} + {b}?", str(a + b))


def _word_problem(rng: random.Random, cfg: ArithmeticConfig) -> QARow:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, cfg.max_operand), rng.randint(1, cfg.max_operand)
    kind = rng.choice(["gain", "loss", "groups"])
    if kind == "gain":
        return QARow(f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", str(a + b))
    if kind == "loss":
        a, b = max(a, b), min(a, b)
        return QARow(f"{name} has {a} {item} and gives away {b}. How many {item} are left?", str(a - b))
    g, n = rng.randint(2, 9), rng.randint(2, 9)
    return QARow(f"{name} has {g} bags with {n} {item} in each bag. How many {item} are there in total?", str(g * n))


def generate_arithmetic(cfg: ArithmeticConfig | None = None) -> tuple[list[QARow], list[QARow]]:
    """(train, test): disjoint by question text, deterministic for a seed."""
    cfg = cfg or ArithmeticConfig()
    rng = random.Random(cfg.seed)
    seen: set[str] = set()
    rows: list[QARow] = []
    wanted = cfg.train_rows + cfg.test_rows
    attempts = 0
    while len(rows) < wanted:
        attempts += 1
        if attempts > wanted * 50:
            raise ValueError(f"cannot make {wanted} distinct questions with max_operand={cfg.max_operand}")
        make = _word_problem if rng.random() < cfg.word_problem_fraction else _expression
        row = make(rng, cfg)
        if row.question not in seen:
            seen.add(row.question)
            rows.append(row)
    return rows[: cfg.train_rows], rows[cfg.train_rows :]
