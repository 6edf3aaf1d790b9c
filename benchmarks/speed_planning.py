"""Speed of the planning/agent estimators (hicra, hicra_entropy, ktae, ucas, stratified) vs their loop references.

    python benchmarks/speed_planning.py [--B 512] [--T 4096] [--group 8] [--vocab 32000] [--loop-rows 16]

CPU, one process. The vectorized estimator runs on the full batch (best of `--repeats`). The loop reference is
far too slow at full size, so it runs once on the first `--loop-rows` rows (whole groups) and its time is
scaled linearly by B / loop_rows (every loop here is linear in the number of rows/groups); the printed ratio
is full-batch loop (extrapolated) / full-batch vectorized.
"""

from __future__ import annotations

import argparse
import time

import torch

from creditlab import get_estimator
from creditlab.credit.loops import LOOPS
from creditlab.sample import random_batch

NAMES = ("hicra", "hicra_entropy", "ktae", "ucas", "stratified")


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=512)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--loop-rows", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n_groups = args.B // args.group
    batch = random_batch(n_groups=n_groups, min_group=args.group, max_group=args.group, T=args.T,
                         vocab=args.vocab, seed=0, empty_row_prob=0.02, shuffle=False)
    sub = batch.select(torch.arange(args.loop_rows))
    scale = batch.B / sub.B
    print(f"batch B={batch.B} T={batch.T} groups of {args.group}, vocab {args.vocab}, "
          f"{int(batch.response_mask.sum())} valid tokens; loops on {sub.B} rows x {scale:.0f}")
    print(f"{'estimator':<15}{'vectorized s':>14}{'loop s (extrap.)':>18}{'ratio':>10}")
    for name in NAMES:
        est = get_estimator(name)
        vec = _timed(lambda est=est: est(batch), args.repeats)
        loop = _timed(lambda name=name: LOOPS[name](sub), 1) * scale
        print(f"{name:<15}{vec:>14.3f}{loop:>18.1f}{loop / vec:>9.0f}x")


if __name__ == "__main__":
    main()
