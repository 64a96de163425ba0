"""Paired statistics for skill transfer: exact McNemar, Wilson intervals, the question-level
paired bootstrap (checked against a slow plain-Python reference on the same draws), and
retention that refuses to divide by a source gain that is indistinguishable from noise."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest

from resa_engine.stats import (
    PairedComparison,
    Retention,
    mcnemar_exact,
    paired_comparison,
    pass_at_1,
    retention,
    wilson_interval,
)

T, F = True, False


def exact_mcnemar_reference(b: int, c: int) -> float:
    """2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), summed downward from C(n, k) in exact integers."""
    n, k = b + c, min(b, c)
    term = math.comb(n, k)
    total = term
    for i in range(k, 0, -1):
        term = term * i // (n - i + 1)  # C(n, i-1) from C(n, i)
        total += term
    return min(1.0, float(Fraction(2 * total, 2**n)))


def reference_bootstrap(base, arm, n_boot: int, seed: int) -> list[float]:
    """Plain-Python question bootstrap of the pass@1 difference, drawing exactly as the module does."""
    q_count = len(base)
    rng = np.random.Generator(np.random.PCG64(seed))
    draws = rng.integers(0, q_count, size=(n_boot, q_count))
    diffs = []
    for row in draws.tolist():
        gain = 0
        pairs = 0
        for q in row:
            gain += sum(arm[q]) - sum(base[q])
            pairs += len(base[q])
        diffs.append(gain / pairs)
    return diffs


def flip_table(n_questions: int, base_right: set[int], arm_right: set[int]) -> tuple[list, list]:
    """One sample per question: base/arm are right exactly on the given question indices."""
    base = [[q in base_right] for q in range(n_questions)]
    arm = [[q in arm_right] for q in range(n_questions)]
    return base, arm


# ---------------------------------------------------------------- McNemar


def test_mcnemar_without_discordant_pairs_is_one():
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_five_gains_no_losses():
    assert mcnemar_exact(5, 0) == pytest.approx(2 * 0.5**5, abs=1e-15)
    assert mcnemar_exact(5, 0) == 0.0625


def test_mcnemar_seven_gains_two_losses_matches_hand_computation():
    # 2 * (C(9,0) + C(9,1) + C(9,2)) / 2**9 = 2 * 46 / 512
    assert mcnemar_exact(7, 2) == 0.1796875


def test_mcnemar_is_symmetric_in_gains_and_losses():
    for b, c in [(7, 2), (5, 0), (13, 4), (60, 40), (6000, 5000)]:
        assert mcnemar_exact(b, c) == mcnemar_exact(c, b)


def test_mcnemar_is_capped_at_one():
    # 2 * P(X <= 3 | n=6) = 2 * 42/64 > 1
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(4, 5) == 1.0


def test_mcnemar_moderate_counts_equal_exact_fraction():
    expected = float(Fraction(2 * sum(math.comb(100, i) for i in range(41)), 2**100))
    assert mcnemar_exact(60, 40) == expected
    assert 0.05 < expected < 0.06  # sanity: the well-known ~0.057 for 60 vs 40


def test_mcnemar_large_counts_are_finite_and_match_exact_sum():
    p = mcnemar_exact(6000, 5000)
    assert math.isfinite(p)
    assert 0.0 < p < 1.0
    assert p == pytest.approx(exact_mcnemar_reference(6000, 5000), rel=1e-9)


def test_mcnemar_near_even_large_counts_match_exact_sum():
    p = mcnemar_exact(5600, 5400)
    assert p == pytest.approx(exact_mcnemar_reference(5600, 5400), rel=1e-9)
    assert 0.05 < p < 0.07


def test_mcnemar_million_pairs_agrees_with_continuity_corrected_normal():
    b, c = 500_500, 499_500
    n = b + c
    z = (c + 0.5 - n / 2) / (math.sqrt(n) / 2)
    normal_p = math.erfc(-z / math.sqrt(2))  # 2 * Phi(z)
    p = mcnemar_exact(b, c)
    assert p == pytest.approx(normal_p, abs=1e-6)
    assert 0.31 < p < 0.33


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


# ---------------------------------------------------------------- Wilson


def test_wilson_no_successes_has_exact_zero_lower_end():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0
    assert hi == pytest.approx(0.2775, abs=1e-4)


def test_wilson_all_successes_has_exact_one_upper_end():
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4)
    assert hi == 1.0


def test_wilson_half_successes_known_values():
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4)
    assert hi == pytest.approx(0.7634, abs=1e-4)


def test_wilson_without_data_is_whole_unit_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, -3) == (0.0, 1.0)


def test_wilson_rejects_more_successes_than_trials():
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


# ---------------------------------------------------------------- pass@1


def test_pass_at_1_is_mean_over_all_pairs_not_over_questions():
    # Question means 1.0 and 0.25 average to 0.625, but over pairs it is 2/5.
    assert pass_at_1([[T], [T, F, F, F]]) == pytest.approx(0.4)


def test_pass_at_1_without_pairs_is_zero():
    assert pass_at_1([]) == 0.0
    assert pass_at_1([[], []]) == 0.0


# ---------------------------------------------------------------- paired comparison


def test_paired_comparison_hand_made_table():
    # 8 questions x 1 sample: arm fixes questions 4, 5, 6 and breaks question 3.
    base, arm = flip_table(8, base_right={0, 1, 2, 3}, arm_right={0, 1, 2, 4, 5, 6})
    r = paired_comparison(base, arm, n_boot=2000, seed=0)
    assert r.base_acc == 0.5
    assert r.arm_acc == 0.75
    assert r.diff == 0.25
    assert r.gained == 3
    assert r.lost == 1
    assert r.mcnemar_p == 0.625  # 2 * (1 + 4) / 16
    assert r.n_questions == 8
    assert r.n_pairs == 8
    lo, hi = r.ci95
    assert lo <= r.diff <= hi
    assert lo < 0.25 < hi


def test_identical_arms_have_zero_difference_and_degenerate_interval():
    base = [[T, F, T], [F, F, F], [T, T, T], [F, T, F]]
    r = paired_comparison(base, [list(row) for row in base], n_boot=500, seed=3)
    assert r.diff == 0.0
    assert r.ci95 == (0.0, 0.0)
    assert r.mcnemar_p == 1.0
    assert (r.gained, r.lost) == (0, 0)
    assert r.arm_acc == r.base_acc == pytest.approx(6 / 12)


def test_bootstrap_interval_is_reproducible_for_a_seed():
    rng = np.random.default_rng(42)
    base = (rng.random((60, 2)) < 0.5).tolist()
    arm = (rng.random((60, 2)) < 0.6).tolist()
    a = paired_comparison(base, arm, n_boot=3000, seed=7)
    b = paired_comparison(base, arm, n_boot=3000, seed=7)
    c = paired_comparison(base, arm, n_boot=3000, seed=8)
    assert a == b
    assert a.ci95 != c.ci95
    assert (a.diff, a.gained, a.lost, a.mcnemar_p) == (c.diff, c.gained, c.lost, c.mcnemar_p)
    for r in (a, c):
        assert r.ci95[0] <= r.diff <= r.ci95[1]


def test_multi_sample_questions_pair_by_sample_index():
    # Same number right per question in both arms, but on different samples (seeds):
    # pass@1 is equal, yet the pairs are discordant.
    base = [[T, F, F], [T, T, F], [F, F, F]]
    arm = [[F, T, F], [T, F, T], [F, F, T]]
    r = paired_comparison(base, arm, n_boot=500, seed=0)
    assert r.n_questions == 3
    assert r.n_pairs == 9
    assert r.base_acc == pytest.approx(3 / 9)
    assert r.arm_acc == pytest.approx(4 / 9)
    assert r.diff == pytest.approx(1 / 9)
    assert r.gained == 3  # q0 s1, q1 s2, q2 s2
    assert r.lost == 2  # q0 s0, q1 s1
    assert r.mcnemar_p == 1.0  # 2 * P(X <= 2 | n=5) = 2 * 16/32


def test_point_estimate_weights_questions_by_their_samples():
    base = [[F], [F, F, F]]
    arm = [[T], [F, F, F]]
    r = paired_comparison(base, arm, n_boot=200, seed=0)
    assert r.diff == pytest.approx(1 / 4)  # not (1 + 0) / 2


def test_bootstrap_interval_equals_slow_reference_on_same_draws():
    rng = np.random.default_rng(5)
    # Ragged: questions have 1..4 samples, so the pair weighting matters.
    sizes = rng.integers(1, 5, size=40).tolist()
    base = [(rng.random(s) < 0.4).tolist() for s in sizes]
    arm = [(rng.random(s) < 0.55).tolist() for s in sizes]
    n_boot, seed = 2000, 11
    expected = tuple(float(x) for x in np.percentile(reference_bootstrap(base, arm, n_boot, seed), [2.5, 97.5]))
    r = paired_comparison(base, arm, n_boot=n_boot, seed=seed)
    assert r.ci95 == expected
    assert r.diff == pytest.approx((sum(map(sum, arm)) - sum(map(sum, base))) / sum(sizes))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="number of questions"):
        paired_comparison([[T], [F]], [[T]])
    with pytest.raises(ValueError, match="question 1"):
        paired_comparison([[T, F], [F, F]], [[T, F], [F]])
    with pytest.raises(ValueError, match="no questions"):
        paired_comparison([], [])


def test_paired_comparison_to_dict_is_json_with_list_interval():
    base, arm = flip_table(8, base_right={0, 1, 2, 3}, arm_right={0, 1, 2, 4, 5, 6})
    r = paired_comparison(base, arm, n_boot=300, seed=0)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["ci95"] == [r.ci95[0], r.ci95[1]]
    assert d["diff"] == 0.25
    assert (d["gained"], d["lost"], d["n_pairs"]) == (3, 1, 8)
    assert PairedComparison(**{**d, "ci95": tuple(d["ci95"])}) == r


# ---------------------------------------------------------------- retention


def transfer_tables() -> tuple[list, list, list]:
    """100 questions: base right on 0..29; source also fixes 30..69; the arm fixes 30..49."""
    base = [[q < 30] for q in range(100)]
    source = [[q < 70] for q in range(100)]
    arm = [[q < 50] for q in range(100)]
    return base, source, arm


def test_retention_is_undefined_when_source_does_not_help():
    base, _, arm = transfer_tables()
    r = retention(base, [list(row) for row in base], arm, n_boot=1000, seed=0)
    assert r.defined is False
    assert r.value is None
    assert r.ci95 is None
    assert r.reason == "source gain's 95% interval [0.000, 0.000] contains 0"
    assert r.source_gain.diff == 0.0
    assert r.arm_gain.diff == pytest.approx(0.2)


def test_retention_is_undefined_when_source_gain_interval_straddles_zero():
    # Source fixes 2 and breaks 1 of 40: a gain well inside the noise.
    base, source = flip_table(40, base_right=set(range(20)), arm_right=set(range(1, 22)))
    r = retention(base, source, source, n_boot=2000, seed=0)
    lo, hi = r.source_gain.ci95
    assert lo < 0 < hi
    assert not r.defined and r.value is None and r.ci95 is None
    assert f"[{lo:.3f}, {hi:.3f}]" in r.reason
    assert "contains 0" in r.reason


def test_retention_when_source_clearly_helps():
    base, source, arm = transfer_tables()
    r = retention(base, source, arm, n_boot=4000, seed=1)
    assert r.defined is True
    assert r.reason == ""
    assert r.value == 0.5
    assert r.source_gain.diff == pytest.approx(0.4)
    assert r.arm_gain.diff == pytest.approx(0.2)
    assert r.source_gain.gained == 40 and r.arm_gain.gained == 20
    lo, hi = r.ci95
    assert lo <= 0.5 <= hi
    assert 0.0 <= lo and hi <= 1.2
    assert lo < hi


def test_retention_gains_share_the_resamples_of_paired_comparison():
    base, source, arm = transfer_tables()
    r = retention(base, source, arm, n_boot=1500, seed=4)
    assert r.source_gain == paired_comparison(base, source, n_boot=1500, seed=4)
    assert r.arm_gain == paired_comparison(base, arm, n_boot=1500, seed=4)


def test_retention_interval_drops_resamples_with_zero_source_gain():
    # 6 questions, source fixes 0..2: about 0.5**6 = 1.6% of resamples draw none of them (zero
    # source gain), yet the 2.5th percentile of the source gain stays above 0, so retention is
    # defined. The arm fixes 0 and 1 but breaks 5, so those resamples have a non-zero arm gain.
    base, source = flip_table(6, base_right={5}, arm_right={0, 1, 2, 5})
    _, arm = flip_table(6, base_right=set(), arm_right={0, 1})
    n_boot, seed = 10_000, 2
    draws = np.random.Generator(np.random.PCG64(seed)).integers(0, 6, size=(n_boot, 6)).tolist()
    ratios = []
    dropped = 0
    for row in draws:
        src = sum(source[q][0] - base[q][0] for q in row)
        gain = sum(arm[q][0] - base[q][0] for q in row)
        if src == 0:
            dropped += 1
            continue
        ratios.append(gain / src)
    assert dropped > 100  # the case under test occurs on these draws
    r = retention(base, source, arm, n_boot=n_boot, seed=seed)
    assert r.defined
    assert r.source_gain.ci95[0] > 0
    assert r.value == pytest.approx(1 / 3)
    assert r.ci95 == tuple(float(x) for x in np.percentile(ratios, [2.5, 97.5]))


def test_retention_shape_mismatch_raises():
    base, source, arm = transfer_tables()
    with pytest.raises(ValueError):
        retention(base, source, arm[:-1], n_boot=100)


def test_retention_to_dict_is_json():
    base, source, arm = transfer_tables()
    defined = retention(base, source, arm, n_boot=500, seed=0)
    d = json.loads(json.dumps(defined.to_dict()))
    assert d["value"] == 0.5
    assert d["defined"] is True
    assert d["ci95"] == [defined.ci95[0], defined.ci95[1]]
    assert d["source_gain"]["gained"] == 40
    assert d["arm_gain"]["ci95"] == list(defined.arm_gain.ci95)

    undefined = retention(base, base, arm, n_boot=500, seed=0)
    u = json.loads(json.dumps(undefined.to_dict()))
    assert u["value"] is None and u["ci95"] is None and u["defined"] is False
    assert "contains 0" in u["reason"]
    assert isinstance(undefined, Retention)
