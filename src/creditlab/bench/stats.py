"""Paired comparisons of benchmark runs that share seeds: per-seed differences, their mean ± std, a sign test.

    d = paired_differences({0: 0.52, 1: 0.48, 2: 0.61}, {0: 0.50, 1: 0.50, 2: 0.55})
    d.mean, d.std, d.sign_p, d.n         # 0.02, 0.04, 1.0, 3

Seeds are matched by id (a seed missing on either side is left out). The sign test is two-sided and exact: under
"neither is better", each non-zero difference is positive with probability 1/2, so p = P(|#pos - #neg| at least as
large as observed) from Binomial(n_nonzero, 1/2). With 3 seeds the smallest possible p is 0.25: three seeds can
show a consistent direction, never significance; the report says so instead of hiding it.
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
    def wins(self) -> tuple[int, int, int]:
        """(positive, zero, negative) differences (|d| < 1e-12 counts as zero)."""
        pos = sum(d > 1e-12 for d in self.diffs)
        neg = sum(d < -1e-12 for d in self.diffs)
        return pos, self.n - pos - neg, neg

    @property
    def sign_p(self) -> float:
        return sign_test(*self.wins[::2])


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
