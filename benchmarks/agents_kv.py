"""Multi-turn rollout throughput: KV-cache reuse across turns vs re-prefilling every turn, in one process.

    PYTHONPATH=src python benchmarks/agents_kv.py --policy tiny --task search --problems 4 --group 4 --turns 4
    PYTHONPATH=src python benchmarks/agents_kv.py --policy smollm2 --task search --problems 4 --group 4 --turns 4

Both modes run the same episodes (same seed -> same tokens; the script checks it) alternately, `--repeats` times
each; the table gives the median wall time, generated action tokens per second, and the ratio. Time is what the
machine gave this process: on a shared machine run it when it is quiet, and read only the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from creditlab.policy import load_policy
from creditlab.rollout.hf import SamplingConfig
from creditlab.rollout.multiturn import MultiTurn
from creditlab.tasks import get_task


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="tiny")
    p.add_argument("--task", default="search")
    p.add_argument("--problems", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--tokens", type=int, default=16, help="max tokens per action")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy(args.policy, seed=0)
    task = get_task(args.task)
    problems = task.problems("train", args.problems, seed=0)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.tokens)
    times: dict[bool, list[float]] = {True: [], False: []}
    batches = {}
    for _ in range(args.repeats):
        for kv in (True, False):
            t0 = time.perf_counter()
            batch, _ = MultiTurn(max_turns=args.turns, kv_reuse=kv).run(policy, task, problems, args.group, sampling,
                                                                        seed=1)
            times[kv].append(time.perf_counter() - t0)
            batches[kv] = batch
    same = torch.equal(batches[True].response_ids, batches[False].response_ids)
    gap = float((batches[True].logprobs - batches[False].logprobs).abs().max())
    actions = int(batches[True].response_mask.sum())
    rows = int(batches[True].response_ids.shape[0])
    turns = float((batches[True].turn_ids.max(1).values + 1).float().mean())
    print(f"policy={args.policy} task={args.task} episodes={rows} mean turns={turns:.2f} action tokens={actions} "
          f"row length={batches[True].response_ids.shape[1]} threads={torch.get_num_threads()}")
    print(f"same tokens in both modes: {same}; max |logprob gap| = {gap:.2e}")
    print("| mode | median s | action tok/s |\n|---|---|---|")
    for kv, name in ((True, "KV reuse"), (False, "re-prefill")):
        med = statistics.median(times[kv])
        print(f"| {name} | {med:.2f} | {actions / med:.1f} |")
    print(f"speed-up (re-prefill / KV reuse): {statistics.median(times[False]) / statistics.median(times[True]):.2f}x")


if __name__ == "__main__":
    main()
