"""Learning comparison of agent estimators on an environment task: estimators x seeds through `train(TrainConfig)`.

    # GiGPO vs GRPO vs MT-GRPO on Sokoban, tiny policy warm-started on BFS solutions (CPU, ~minutes per run)
    PYTHONPATH=src python benchmarks/agents_learning.py --task sokoban --estimators gigpo,grpo,mt_grpo --seeds 3 \\
        --steps 60 --policy tiny --sft-steps 400 --out runs/agents-sokoban
    # Stratified GRPO vs GRPO on the search task, SmolLM2 warm-started on the search demonstrator's episodes
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/agents_learning.py --task search --estimators stratified,grpo \\
        --seeds 3 --steps 12 --policy smollm2 --sft-steps 20 --sft-batch 8 --sft-lr 3e-5 --lr 1e-5 --prompts 4 \\
        --group 8 --turns 5 --max-new-tokens 24 --eval-every 6 --eval-problems 32 --micro-batch-rows 8 \\
        --out runs/agents-search

Every run is an ordinary trainer run (runs/<out>/<estimator>/seed<k>/, with its config.json); a finished run is
skipped when the command is repeated. The report (report.md, curves.png) gives, per estimator, the training success
rate (mean of the last 10 steps) and the final greedy held-out success, mean +- std over seeds, plus the anchor-state
repetition GiGPO relies on (share of turns whose state recurs in the group, mean step-group size). Learning claims
need the spread: a difference smaller than the seeds' std is within noise, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path

from creditlab.tasks import get_task
from creditlab.train.config import (
    AgentConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
)


def warm_start(args: argparse.Namespace, out: Path) -> str:
    if args.sft_steps <= 0:
        return args.policy
    from creditlab.train.sft import sft

    target = out / "warmstart"
    if not (target / "config.json").exists():
        sft(SFTConfig(task=args.task, task_kwargs=args.task_kwargs, policy=args.policy, out_dir=str(target),
                      steps=args.sft_steps, batch_size=args.sft_batch, lr=args.sft_lr, eval_problems=64,
                      max_new_tokens=args.max_new_tokens * 2, max_turns=args.turns))
    return str(target)


def run_one(args: argparse.Namespace, policy: str, estimator: str, seed: int, out: Path) -> list[dict]:
    run_dir = out / estimator / f"seed{seed}"
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines()]
        if rows and rows[-1]["step"] == args.steps and "eval/accuracy" in rows[-1]:
            return rows
    from creditlab.train.loop import train

    cfg = TrainConfig(
        run=RunConfig(task=args.task, task_kwargs=args.task_kwargs, policy=policy, estimator=estimator, seed=seed,
                      steps=args.steps, out_dir=str(run_dir), resume=(run_dir / "latest").exists(), train_pool=1024),
        rollout=RolloutConfig(prompts_per_step=args.prompts, group_size=args.group, max_new_tokens=args.max_new_tokens),
        optim=OptimConfig(lr=args.lr, micro_batch_rows=args.micro_batch_rows),
        eval=EvalConfig(eval_every=args.eval_every, eval_problems=args.eval_problems),
        log=LogConfig(checkpoint_every=10, tensorboard=False, progress=False, sample_every=0),
        agent=AgentConfig(agent_max_turns=args.turns))
    train(cfg)
    return [json.loads(x) for x in metrics.read_text().splitlines()]


def _ms(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def report(args: argparse.Namespace, results: dict[str, list[list[dict]]], out: Path) -> str:
    lines = [f"# {args.task}: {', '.join(results)} ({args.seeds} seeds, {args.steps} steps, policy {args.policy}"
             f"{f' + {args.sft_steps} SFT steps' if args.sft_steps else ''})", "",
             "| estimator | train success (last 10 steps) | initial greedy success | final greedy success "
             "| turns / episode | tool calls / episode | anchor repeat | step-group size |",
             "|---|---|---|---|---|---|---|---|"]
    summary = {}
    # the tool whose calls are Stratified GRPO's strata (search: "search"); grid envs have none
    tool = getattr(get_task(args.task, **json.loads(args.task_kwargs)).make_env(), "stratum_tool", None)
    for est, runs in results.items():
        train = [statistics.mean(r.get("agent/success", 0.0) for r in rows[1:][-10:]) for rows in runs]
        initial = [rows[0].get("eval/accuracy", 0.0) for rows in runs]
        final = [rows[-1].get("eval/accuracy", 0.0) for rows in runs]
        turns = [statistics.mean(r.get("agent/turns", 0.0) for r in rows[1:]) for rows in runs]
        calls = [statistics.mean(r.get(f"agent/calls_{tool}", 0.0) for r in rows[1:]) for rows in runs]
        rep = [statistics.mean(r.get("agent/anchor_repeat_frac", 0.0) for r in rows[1:]) for rows in runs]
        size = [statistics.mean(r.get("agent/anchor_group_size", 0.0) for r in rows[1:]) for rows in runs]
        summary[est] = (train, final)
        lines.append(f"| {est} | {_ms(train)} | {_ms(initial)} | {_ms(final)} | {_ms(turns)} | "
                     f"{_ms(calls) if tool else '—'} | {_ms(rep)} | {_ms(size)} |")
    ests = list(summary)
    if len(ests) >= 2:
        base = "grpo" if "grpo" in ests else ests[-1]
        for est in (e for e in ests if e != base):
            d = statistics.mean(summary[est][0]) - statistics.mean(summary[base][0])
            noise = max(statistics.stdev(summary[e][0]) if len(summary[e][0]) > 1 else 0.0 for e in (est, base))
            verdict = "within noise" if abs(d) <= noise else "larger than the seeds' std"
            lines.append(f"\n{est} - {base}: train success {d:+.3f} ({verdict}, seed std {noise:.3f})")
            per_seed = [f"{a - b:+.3f}" for a, b in zip(summary[est][1], summary[base][1])]
            lines.append(f"{est} - {base}: final greedy success per seed {', '.join(per_seed)}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines.append(f"\ncommit {commit}; command: python benchmarks/agents_learning.py {' '.join(args.argv)}")
    return "\n".join(lines)


def plot(results: dict[str, list[list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for est, runs in results.items():
        steps = [r["step"] for r in runs[0][1:]]
        curves = [[r.get("agent/success", 0.0) for r in rows[1:]] for rows in runs]
        mean = [statistics.mean(c[i] for c in curves) for i in range(len(steps))]
        ax.plot(steps, mean, label=est)
    ax.set_xlabel("RL step")
    ax.set_ylabel("training success rate (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="sokoban")
    p.add_argument("--task-kwargs", default="{}")
    p.add_argument("--estimators", default="gigpo,grpo,mt_grpo")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--policy", default="tiny")
    p.add_argument("--sft-steps", type=int, default=400, help="warm-start on the task's demonstrations (0: none)")
    p.add_argument("--sft-lr", type=float, default=3e-3)
    p.add_argument("--sft-batch", type=int, default=32, help="demonstrations per warm-start step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--micro-batch-rows", type=int, default=0, help="rows per forward/backward (0: all at once)")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--eval-problems", type=int, default=64)
    p.add_argument("--out", default="runs/agents-learning")
    args = p.parse_args()
    import sys

    args.argv = sys.argv[1:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = warm_start(args, out)
    results = {est: [run_one(args, policy, est, s, out) for s in range(args.seeds)]
               for est in args.estimators.split(",")}
    text = report(args, results, out)
    (out / "report.md").write_text(text + "\n")
    plot(results, out / "curves.png")
    print(text)


if __name__ == "__main__":
    main()
