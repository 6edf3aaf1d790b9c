"""Where the vs_trl speed-up comes from: one SmolLM2 batch, timed through each path of the update and the sampler.

    python benchmarks/speed_update.py --threads 1            # update paths, then sampling paths (~6 min)
    python benchmarks/speed_update.py --only update --precision fp32 --repeats 4

One batch of the vs_trl setting (8 one-digit `chain_sum` prompts × 4 samples × 40 new tokens, SmolLM2-135M-Instruct
with its chat template) is sampled once; then, in one process, each variant runs once untimed and then `--repeats`
rounds time every variant once in turn (the minimum and every time are printed):
  update   `sequence_logprobs` forward + backward: one forward per row / shared prompts / shared prompts with the
           response-length buckets (the default), each in fp32 and under bf16 autocast (fp32 weights);
  sample   `generate` for the same prompts: fp32, bf16 autocast, and a pure-bf16 copy of the model.
Ratios within one run are what to compare; absolute seconds move with the machine's load.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from creditlab.policy import load_policy
from creditlab.rollout.hf import (
    DEFAULT_LENGTH_BUCKETS,
    SamplingConfig,
    bucketed_positions,
    generate,
    length_bucket_rows,
    sequence_logprobs,
)
from creditlab.tasks import get_task


def round_robin(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Each function once untimed, then `repeats` rounds timing each once in turn (load drift hits all alike)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]]) -> None:
    for name, ts in times.items():
        print(f"{name:<52} {min(ts):7.2f} s  (min of {', '.join(f'{t:.2f}' for t in ts)})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", choices=["update", "sample"], default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both")
    args = p.parse_args()
    precisions = {"fp32": (False,), "bf16": (True,), "both": (False, True)}[args.precision]
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy("smollm2")
    problems = get_task("chain_sum", digits=1, terms=2).problems("train", 8, 0)
    prompts = [policy.format_prompt(q.prompt) for q in problems]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=40, bf16=True)
    batch = generate(policy, prompts, 4, cfg, seed=0)
    print(f"batch: {batch.B} rows, prompt width {batch.prompt_ids.shape[1]}, response width {batch.T}, "
          f"{torch.get_num_threads()} threads")
    tensors = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)

    if args.only in (None, "update"):
        variants = [("one per row", False, 1), ("shared prompts", True, 1),
                    ("shared prompts + length buckets", True, DEFAULT_LENGTH_BUCKETS)]
        widths = bucketed_positions(length_bucket_rows(batch.response_mask, DEFAULT_LENGTH_BUCKETS))
        print(f"length buckets run {widths} of {batch.B * batch.T} response positions "
              f"({int(batch.response_mask.sum())} valid)")
        for bf16 in precisions:
            fns = {}
            for label, share, buckets in variants:
                def step(share: bool = share, bf16: bool = bf16, buckets: int = buckets) -> None:
                    policy.model.zero_grad(set_to_none=True)
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                        logp, _ = sequence_logprobs(policy.model, *tensors, share_prompts=share,
                                                    length_buckets=buckets)
                    logp.sum().backward()
                fns[f"update {'bf16 autocast' if bf16 else 'fp32'}, {label}"] = step
            report(round_robin(fns, args.repeats))
    if args.only in (None, "sample"):
        fns = {}
        for bf16 in precisions:
            s = dataclasses.replace(cfg, bf16=bf16)
            fns[f"sample {'bf16 autocast' if bf16 else 'fp32'}"] = lambda s=s: generate(policy, prompts, 4, s, seed=0)
        if True in precisions:
            shadow = dataclasses.replace(policy, model=copy.deepcopy(policy.model).to(torch.bfloat16))
            fns["sample pure-bf16 model copy"] = lambda: generate(shadow, prompts, 4, dataclasses.replace(
                cfg, bf16=False), seed=0)
        report(round_robin(fns, args.repeats))


if __name__ == "__main__":
    main()
