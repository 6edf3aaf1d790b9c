"""Speed of the prefix-tree estimators (tempo, treepo): vectorized vs the loop reference, same process, CPU.

    python benchmarks/speed_tree.py [--B 512] [--T 4096] [--group 8] [--vocab 32000] [--loop-rows 64]

The batch imitates real rollouts: groups of `group` responses to one prompt, lengths T/4..T with padding, a
shared opening of 0..64 tokens per group (a chat template / restated question) and, inside each group, some
responses copy a sibling's prefix up to a random point before diverging (so the trie has deep branches).
The loop reference is slow, so by default it is timed on the first `--loop-rows` rows (whole groups) and
scaled linearly to B rows (its cost is linear in the number of tokens); the output says so.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.loops import LOOPS


def tree_batch(B: int, T: int, group: int, vocab: int, seed: int = 0) -> RolloutBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)  # [B,T]
    n_groups = B // group
    opening = torch.randint(0, 65, (n_groups,), generator=g)
    for k in range(n_groups):  # setup only (not timed): shared openings and copied sibling prefixes
        rows = slice(k * group, (k + 1) * group)
        ids[rows, : int(opening[k])] = ids[k * group, : int(opening[k])]
        for j in range(1, group):
            if torch.rand((), generator=g) < 0.5:
                src = k * group + int(torch.randint(0, j, (), generator=g))
                cut = int(torch.randint(0, T, (), generator=g))
                ids[k * group + j, :cut] = ids[src, :cut]
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return RolloutBatch(response_ids=torch.where(mask, ids, 0), response_mask=mask,
                        group_ids=torch.arange(B) // group,
                        rewards=torch.randint(0, 2, (B,), generator=g).float()).validate()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=512)
    p.add_argument("--T", type=int, default=4096)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--loop-rows", type=int, default=64, help="rows timed for the loop (0 = all B rows)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = tree_batch(args.B, args.T, args.group, args.vocab)
    n_loop = args.B if args.loop_rows <= 0 else min(args.B, args.loop_rows - args.loop_rows % args.group)
    sub = batch.select(torch.arange(n_loop))
    print(f"batch B={args.B} T={args.T} group={args.group} vocab={args.vocab} valid tokens="
          f"{int(batch.response_mask.sum())}; torch {torch.__version__}, threads={torch.get_num_threads()}")
    cases = {"tempo": {}, "treepo": {"segment_len": 1}, "treepo(segment_len=512)": {"segment_len": 512}}
    for label, kw in cases.items():
        name = label.split("(")[0]
        est = get_estimator(name)
        vec = timed(lambda est=est, kw=kw: est(batch, **kw), args.repeats)
        loop_sub = timed(lambda name=name, kw=kw: LOOPS[name](sub, **kw), 1)
        loop_full = loop_sub * args.B / n_loop
        check = LOOPS[name](sub, **kw)
        err = float((est(sub, **kw).advantages.double() - check).abs().max())
        scaled = "" if n_loop == args.B else f" (timed on {n_loop} rows, scaled x{args.B / n_loop:g})"
        print(f"{label:26s} vectorized {vec * 1e3:8.1f} ms   loop {loop_full:8.2f} s{scaled}   "
              f"speed-up {loop_full / vec:7.0f}x   max |vec - loop| on the subset {err:.1e}")


if __name__ == "__main__":
    main()
