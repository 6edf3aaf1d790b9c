"""Paired comparisons of benchmark runs that share seeds: per-seed differences, their mean ± std, a sign test.

    d = paired_differences({0: 0.52, 1: 0.48, 2: 0.61}, {0: 0.50, 1: 0.50, 2: 0.55})
    d.mean, d.std, d.sign_p, d.n         # 0.02, 0.04, 1.0, 3
    d.se, d.ci95                         # 0.023, (-0.08, 0.12): standard error and 95 % t-interval of the mean

Seeds are matched by id (a seed missing on either side is left out). The sign test is two-sided and exact: under
"neither is better", each non-zero difference is positive with probability 1/2, so p = P(|#pos - #neg| at least as
large as observed) from Binomial(n_nonzero, 1/2). With 3 seeds the smallest possible p is 0.25: three seeds can
show a consistent direction, never significance; the report says so instead of hiding it.

The t-interval, mean ± t(0.975, n - 1) x std / sqrt(n), treats the differences as independent draws of one
quantity (Student's t, 0.975 quantiles from the standard table for 1-30 degrees of freedom, a third-order
Cornish-Fisher expansion beyond, within 1e-3 there); it says how large a difference the seeds rule out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Paired:
    """Per-seed differences a - b and their summary."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return float(np.mean(self.diffs)) if self.diffs else math.nan

    @property
    def std(self) -> float:
        """Sample std (ddof=1) of the differences; NaN with fewer than 2 seeds."""
        return float(np.std(self.diffs, ddof=1)) if self.n > 1 else math.nan

    @property
    def se(self) -> float:
        """Standard error of the mean, std / sqrt(n); NaN with fewer than 2 seeds."""
        return self.std / math.sqrt(self.n) if self.n > 1 else math.nan

    @property
    def ci95(self) -> tuple[float, float]:
        """Two-sided 95 % Student-t interval of the mean; (NaN, NaN) with fewer than 2 seeds."""
        if self.n < 2:
            return math.nan, math.nan
        half = t_quantile_975(self.n - 1) * self.se
        return self.mean - half, self.mean + half

    @property
    def wins(self) -> tuple[int, int, int]:
        """(positive, zero, negative) differences (|d| < 1e-12 counts as zero)."""
        pos = sum(d > 1e-12 for d in self.diffs)
        neg = sum(d < -1e-12 for d in self.diffs)
        return pos, self.n - pos - neg, neg

    @property
    def sign_p(self) -> float:
        return sign_test(*self.wins[::2])


# Student's t 0.975 quantiles for 1..30 degrees of freedom (standard table)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` >= 1 degrees of freedom (two-sided 95 %)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def sign_test(positive: int, negative: int) -> float:
    """Exact two-sided sign-test p-value for `positive` vs `negative` non-zero differences (1.0 when none)."""
    m = positive + negative
    if m == 0:
        return 1.0
    k = min(positive, negative)
    tail = sum(math.comb(m, i) for i in range(k + 1)) / 2**m
    return min(1.0, 2 * tail)


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """Differences a[s] - b[s] over the seeds both have, in seed order."""
    seeds = tuple(sorted(set(a) & set(b)))
    return Paired(seeds, tuple(float(a[s]) - float(b[s]) for s in seeds))
