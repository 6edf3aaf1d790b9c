"""Paired comparison and sign test: hand-computed values."""

import math

from creditlab.bench.stats import paired_differences, sign_test


def test_sign_test_exact_values():
    # Binomial(3, 1/2): P(all 3 one way) = 1/8, two-sided 1/4 — the smallest p three seeds can give.
    assert sign_test(3, 0) == 0.25 and sign_test(0, 3) == 0.25
    assert sign_test(5, 0) == 2 / 32  # 0.0625
    assert sign_test(2, 1) == 1.0  # (1 + 3) / 8 one-sided, doubled and capped
    assert sign_test(8, 2) == 2 * (1 + 10 + 45) / 1024  # 0.109375
    assert sign_test(0, 0) == 1.0


def test_paired_differences_match_seeds_and_summarise():
    d = paired_differences({0: 0.5, 1: 0.6, 2: 0.7, 5: 1.0}, {0: 0.4, 1: 0.6, 2: 0.5})
    assert d.seeds == (0, 1, 2) and d.n == 3
    assert all(math.isclose(a, b) for a, b in zip(d.diffs, (0.1, 0.0, 0.2)))
    assert math.isclose(d.mean, 0.1) and math.isclose(d.std, 0.1)  # diffs 0.1, 0, 0.2: sample std 0.1
    assert d.wins == (2, 1, 0) and d.sign_p == 0.5  # two positive, no negative: 2 * 1/4


def test_standard_error_and_t_interval_by_hand():
    from creditlab.bench.stats import t_quantile_975

    # diffs 0.1, -0.1, 0.3: mean 0.1, sample std 0.2, se 0.2 / sqrt(3) = 0.11547; t(0.975, 2) = 4.303 (table)
    d = paired_differences({0: 0.1, 1: -0.1, 2: 0.3}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert math.isclose(d.se, 0.2 / math.sqrt(3))
    lo, hi = d.ci95
    assert math.isclose(lo, 0.1 - 4.303 * 0.11547005, rel_tol=1e-6) and math.isclose(hi, 0.1 + 4.303 * 0.11547005,
                                                                                      rel_tol=1e-6)
    # beyond the table: t(0.975, 40) = 2.0211, t(0.975, 120) = 1.9799 (standard table); the expansion is within 1e-3
    assert abs(t_quantile_975(40) - 2.0211) < 1e-3 and abs(t_quantile_975(120) - 1.9799) < 1e-3
    assert abs(t_quantile_975(31) - 2.0395) < 1e-3  # continues the table smoothly
    one = paired_differences({0: 0.5}, {0: 0.4})
    assert math.isnan(one.se) and all(math.isnan(x) for x in one.ci95)
