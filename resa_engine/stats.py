"""Paired statistics for skill-transfer evaluation: did arm X help relative to base?

Every arm (base model, source model, target+adapter, controls) answers the SAME questions with
the SAME seeds: sample k of question q uses one seed in every arm, so `correct[q][k]` is paired
across arms. Comparing arms as if they were independent samples wastes that pairing and ignores
that samples of one question are correlated, so here:

  - pass@1 is the mean correctness over all (question, sample) pairs;
  - the interval of a difference is a paired bootstrap that resamples QUESTIONS (clusters) with
    replacement, keeping every sample of a drawn question and pairing arms on the same draws;
  - the test of a difference is the exact McNemar test over the (question, sample) pairs;
  - retention, (arm - base) / (source - base), is reported only when the source's own gain is
    clearly non-zero; otherwise it is a ratio of noise and is marked undefined with the reason.

Only the standard library and numpy; the bootstrap is vectorised (one n_boot x Q index matrix).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Z95 = 1.959964  # two-sided 95% standard normal quantile
CI_PERCENTILES = (2.5, 97.5)  # percentile bootstrap bounds of a 95% interval
_EXACT_MCNEMAR_MAX_N = 5_000  # above this, big-integer sums get slow; log-space is accurate to ~1e-9
_BOOT_CHUNK_ROWS = 1_024  # resample rows gathered at once: bounds temporaries to ~8 MB at Q=1000


# ---------------------------------------------------------------- single-arm summaries


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Mean correctness over all (question, sample) pairs; 0.0 when there are no pairs."""
    right = 0
    total = 0
    for row in correct:
        values = np.asarray(row, dtype=bool)
        right += int(values.sum())
        total += int(values.size)
    return right / total if total else 0.0


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% with the default z).

    Ends are exactly 0.0 / 1.0 when successes == 0 / n; no data (n <= 0) gives (0.0, 1.0).
    """
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be within [0, {n}], got {successes}")
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / denom
    # Exact ends at the boundaries: the formula gives them only up to rounding.
    lo = 0.0 if successes == 0 else max(0.0, center - half)
    hi = 1.0 if successes == n else min(1.0, center + half)
    return (lo, hi)


# ---------------------------------------------------------------- McNemar


def _binom_half_cdf_exact(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed in exact integers."""
    term = 1  # C(n, 0)
    total = 1
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i+1) from C(n, i); exact division
        total += term
    # int / int true division is correctly rounded even for huge operands.
    return total / (1 << n)


def _binom_half_cdf_log(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), k <= n/2, in log space (no overflow for n ~ 1e6)."""
    log_top = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) - n * math.log(2.0)
    # Terms relative to the largest one (i = k): t[i-1]/t[i] = i / (n - i + 1), all <= 1 for k <= n/2,
    # so the cumulative product only shrinks and harmlessly underflows to 0 far in the tail.
    i = np.arange(k, 0, -1, dtype=np.float64)
    rel = np.cumprod(i / (n - i + 1.0))
    rel_sum = 1.0 + float(rel.sum())
    return math.exp(log_top + math.log(rel_sum))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for b vs c discordant pairs.

    b = pairs right in the arm and wrong in base, c = wrong in the arm and right in base.
    p = min(1, 2 * P(X <= min(b, c))) with X ~ Binomial(b + c, 1/2); no discordant pairs -> 1.0.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    if n <= _EXACT_MCNEMAR_MAX_N:
        tail = _binom_half_cdf_exact(k, n)
    else:
        tail = _binom_half_cdf_log(k, n)
    return min(1.0, 2.0 * tail)


# ---------------------------------------------------------------- paired tables


@dataclass(frozen=True)
class _PairedTable:
    """Per-question counts of two arms that answered the same (question, sample) pairs."""

    n: np.ndarray
    """Samples per question (int64, length Q)."""
    base: np.ndarray
    """Correct samples of base per question (int64)."""
    arm: np.ndarray
    """Correct samples of the arm per question (int64)."""
    gained: int
    """Pairs right in the arm, wrong in base."""
    lost: int
    """Pairs wrong in the arm, right in base."""


def _paired_table(base: Sequence[Sequence[bool]], arm: Sequence[Sequence[bool]]) -> _PairedTable:
    """Check that two arms have the same shape and reduce them to per-question counts."""
    if len(base) != len(arm):
        raise ValueError(f"arms differ in number of questions: base {len(base)}, arm {len(arm)}")
    if len(base) == 0:
        raise ValueError("no questions to compare")
    q_count = len(base)
    n = np.empty(q_count, dtype=np.int64)
    base_right = np.empty(q_count, dtype=np.int64)
    arm_right = np.empty(q_count, dtype=np.int64)
    gained = 0
    lost = 0
    for q in range(q_count):
        xb = np.asarray(base[q], dtype=bool)
        xa = np.asarray(arm[q], dtype=bool)
        if xb.ndim != 1 or xa.ndim != 1:
            raise ValueError(f"question {q}: samples must be a flat list of booleans")
        if xb.size != xa.size:
            raise ValueError(f"question {q}: base has {xb.size} samples, arm has {xa.size}")
        # A question without samples would make a resample's pass rate 0/0.
        if xb.size == 0:
            raise ValueError(f"question {q} has no samples")
        n[q] = xb.size
        base_right[q] = int(xb.sum())
        arm_right[q] = int(xa.sum())
        # Pairing is by sample index: sample k used the same seed in both arms.
        gained += int(np.count_nonzero(xa & ~xb))
        lost += int(np.count_nonzero(~xa & xb))
    return _PairedTable(n=n, base=base_right, arm=arm_right, gained=gained, lost=lost)


def _bootstrap_sums(per_question: Sequence[np.ndarray], n_boot: int, seed: int) -> list[np.ndarray]:
    """Per-resample sums of each per-question vector over n_boot resamples of question indices.

    All vectors share one draw `rng.integers(0, Q, size=(n_boot, Q))` from PCG64(seed), so arms
    (and a ratio's numerator and denominator) are paired on the same resampled questions.
    """
    if n_boot <= 0:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    q_count = len(per_question[0])
    rng = np.random.Generator(np.random.PCG64(seed))
    # One draw for the whole matrix: the stream must not depend on how the sums are chunked.
    idx = rng.integers(0, q_count, size=(n_boot, q_count))
    sums = [np.empty(n_boot, dtype=v.dtype) for v in per_question]
    for start in range(0, n_boot, _BOOT_CHUNK_ROWS):
        rows = idx[start : start + _BOOT_CHUNK_ROWS]
        for vec, out in zip(per_question, sums):
            # Integer per-question counts keep these sums exact, so ties (e.g. a zero gain) are exact.
            out[start : start + len(rows)] = vec[rows].sum(axis=1)
    return sums


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of bootstrap statistics (numpy's default linear interpolation)."""
    lo, hi = np.percentile(values, CI_PERCENTILES)
    return (float(lo), float(hi))


# ---------------------------------------------------------------- paired comparison


@dataclass(frozen=True)
class PairedComparison:
    """An arm against base on the same (question, sample) pairs."""

    arm_acc: float
    """pass@1 of the arm: mean correctness over all (question, sample) pairs."""
    base_acc: float
    """pass@1 of base over the same pairs."""
    diff: float
    """arm_acc - base_acc."""
    ci95: tuple[float, float]
    """Paired bootstrap 95% percentile interval of diff, resampling questions with replacement."""
    mcnemar_p: float
    """Two-sided exact McNemar p-value over the (question, sample) pairs."""
    gained: int
    """Pairs right in the arm, wrong in base (McNemar's b)."""
    lost: int
    """Pairs wrong in the arm, right in base (McNemar's c)."""
    n_questions: int
    """Questions compared."""
    n_pairs: int
    """(question, sample) pairs compared."""

    def to_dict(self) -> dict:
        """JSON-able dict; ci95 as a 2-element list."""
        return {
            "arm_acc": self.arm_acc,
            "base_acc": self.base_acc,
            "diff": self.diff,
            "ci95": [self.ci95[0], self.ci95[1]],
            "mcnemar_p": self.mcnemar_p,
            "gained": self.gained,
            "lost": self.lost,
            "n_questions": self.n_questions,
            "n_pairs": self.n_pairs,
        }


def _comparison(table: _PairedTable, boot_diff_sums: np.ndarray, boot_n_sums: np.ndarray) -> PairedComparison:
    """A PairedComparison from a table and its per-resample sums of (arm - base) and of samples."""
    n_pairs = int(table.n.sum())
    arm_right = int(table.arm.sum())
    base_right = int(table.base.sum())
    # Mean over the pairs of the resampled questions = pass rates weighted by samples per question.
    boot_diffs = boot_diff_sums / boot_n_sums
    return PairedComparison(
        arm_acc=arm_right / n_pairs,
        base_acc=base_right / n_pairs,
        diff=(arm_right - base_right) / n_pairs,
        ci95=_percentile_interval(boot_diffs),
        mcnemar_p=mcnemar_exact(table.gained, table.lost),
        gained=table.gained,
        lost=table.lost,
        n_questions=len(table.n),
        n_pairs=n_pairs,
    )


def paired_comparison(
    base: Sequence[Sequence[bool]],
    arm: Sequence[Sequence[bool]],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Compare an arm with base on the same questions and seeds (base[q][k] pairs with arm[q][k]).

    Raises ValueError when the shapes differ (questions, or samples of some question) or there
    are no questions.
    """
    table = _paired_table(base, arm)
    diff_sums, n_sums = _bootstrap_sums([table.arm - table.base, table.n], n_boot, seed)
    return _comparison(table, diff_sums, n_sums)


# ---------------------------------------------------------------- retention


@dataclass(frozen=True)
class Retention:
    """How much of the source's gain over base an arm keeps: (arm - base) / (source - base)."""

    value: float | None
    """(arm - base) / (source - base); None when undefined."""
    ci95: tuple[float, float] | None
    """Paired bootstrap 95% percentile interval of the ratio over questions; None when undefined."""
    defined: bool
    """Whether the source's gain is clearly non-zero, so the ratio means something."""
    reason: str
    """Empty when defined; otherwise why not."""
    source_gain: PairedComparison
    """The source against base."""
    arm_gain: PairedComparison
    """The arm against base."""

    def to_dict(self) -> dict:
        """JSON-able dict; ci95 as a 2-element list or None, the gains as nested dicts."""
        return {
            "value": self.value,
            "ci95": None if self.ci95 is None else [self.ci95[0], self.ci95[1]],
            "defined": self.defined,
            "reason": self.reason,
            "source_gain": self.source_gain.to_dict(),
            "arm_gain": self.arm_gain.to_dict(),
        }


def retention(
    base: Sequence[Sequence[bool]],
    source: Sequence[Sequence[bool]],
    arm: Sequence[Sequence[bool]],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
) -> Retention:
    """Share of the source's gain over base that the arm keeps, with a paired bootstrap interval.

    Undefined whenever the source gain's paired 95% interval contains 0 (a ratio of noise).
    When defined, resamples whose source gain is exactly 0 are dropped from the ratio's interval.
    Both gains and the ratio use the same question resamples.
    """
    src_table = _paired_table(base, source)
    arm_table = _paired_table(base, arm)
    if not np.array_equal(src_table.n, arm_table.n):
        raise ValueError("source and arm differ in samples per question")
    src_sums, arm_sums, n_sums = _bootstrap_sums(
        [src_table.arm - src_table.base, arm_table.arm - arm_table.base, src_table.n], n_boot, seed
    )
    source_gain = _comparison(src_table, src_sums, n_sums)
    arm_gain = _comparison(arm_table, arm_sums, n_sums)

    def undefined(reason: str) -> Retention:
        return Retention(None, None, False, reason, source_gain, arm_gain)

    lo, hi = source_gain.ci95
    if lo <= 0.0 <= hi:
        return undefined(f"source gain's 95% interval [{lo:.3f}, {hi:.3f}] contains 0")
    # Both gains are over the same pairs, so the ratio of correct-count differences is exact.
    src_gain_count = int(src_table.arm.sum() - src_table.base.sum())
    if src_gain_count == 0:  # a percentile interval can, rarely, exclude its own point estimate
        return undefined("source gain is exactly 0")
    value = int(arm_table.arm.sum() - arm_table.base.sum()) / src_gain_count
    keep = src_sums != 0  # exact integer zeros: resamples where the ratio has no denominator
    if not keep.any():
        return undefined("every bootstrap resample has zero source gain")
    ratios = arm_sums[keep] / src_sums[keep]  # per-pair normalisation cancels in the ratio
    return Retention(value, _percentile_interval(ratios), True, "", source_gain, arm_gain)
