"""Which task leaves SmolLM2-135M-Instruct room to learn? Greedy held-out accuracy of the untrained model per task.

    python benchmarks/smollm2_headroom.py --problems 64 --threads 2            # the candidates below (~10 min)
    python benchmarks/smollm2_headroom.py --tasks chain_sum_2d --grpo-steps 5  # + a few GRPO steps of one task

The `creditlab bench --preset smollm2` task was picked with this: a task where the untrained policy is far from
0 and from 1 (greedy held-out accuracy well inside (0.05, 0.6)) and answers are short enough for CPU rollouts.
`--grpo-steps N` then trains `grpo` for N steps at the preset's sizes and prints held-out accuracy before/after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from creditlab.bench.learning import PRESETS, bench_tasks, run_config
from creditlab.policy import load_policy
from creditlab.tasks import get_task
from creditlab.train.loop import evaluate

# name -> (task, task_kwargs, max_new_tokens)
CANDIDATES = {
    "chain_sum_1d": ("chain_sum", {"digits": 1, "terms": 2}, 40),
    "chain_sum_1d3": ("chain_sum", {"digits": 1, "terms": 3}, 40),
    "chain_sum_2d": ("chain_sum", {"digits": 2, "terms": 2}, 40),
    "chain_sum_2d3": ("chain_sum", {"digits": 2, "terms": 3}, 48),
    "basic_arithmetic": ("basic_arithmetic", {}, 64),
    "gsm_symbolic": ("gsm_symbolic", {}, 160),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default=",".join(CANDIDATES), help=f"comma-separated, from {sorted(CANDIDATES)}")
    p.add_argument("--problems", type=int, default=64, help="held-out problems per task")
    p.add_argument("--grpo-steps", type=int, default=0, help="also train grpo this many steps (preset sizes)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    policy = load_policy("smollm2")
    rows = []
    for name in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        task_name, kwargs, max_new = CANDIDATES[name]
        task = get_task(task_name, **kwargs)
        t0 = time.perf_counter()
        acc = evaluate(policy, task, task.problems("test", args.problems, 0), max_new_tokens=max_new, chunk=32)
        row = {"task": name, "task_kwargs": kwargs, "max_new_tokens": max_new, "problems": args.problems,
               "greedy_accuracy": acc, "seconds": time.perf_counter() - t0}
        if args.grpo_steps:
            row.update(grpo(task_name, kwargs, max_new, args.grpo_steps, args.problems))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


def grpo(task_name: str, kwargs: dict, max_new: int, steps: int, problems: int) -> dict:
    """Held-out accuracy before/after `steps` grpo steps at the smollm2 preset's trainer settings."""
    from creditlab.train.loop import train

    preset = replace(PRESETS["smollm2"], steps=steps, eval_every=steps, eval_problems=problems,
                     max_new_tokens=max_new)
    task = replace(bench_tasks()[preset.tasks[0]], task=task_name, task_kwargs=json.dumps(kwargs))
    with tempfile.TemporaryDirectory(prefix="creditlab-headroom-") as tmp:
        cfg = run_config(preset, task, "smollm2", "grpo", 0, Path(tmp) / "run", False)
        cfg.log = replace(cfg.log, checkpoint_every=10**9, sample_every=0)
        t0 = time.perf_counter()
        r = train(cfg)
    return {"grpo_steps": steps, "grpo_before": r["initial_accuracy"], "grpo_after": r["final_accuracy"],
            "grpo_seconds": time.perf_counter() - t0}


if __name__ == "__main__":
    sys.exit(main())
