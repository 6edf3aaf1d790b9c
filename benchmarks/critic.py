"""PPO with a learned critic vs GRPO vs MA-RLHF vs POAD: held-out accuracy against samples and against wall-clock
(the critic's compute included), the critic's explained variance over training, and its share of step time.

    python benchmarks/critic.py --out runs/critic_bench                    # SmolLM2 on chain_sum, 4 methods x 3 seeds
    python benchmarks/critic.py --out runs/critic_bench_model --critic model:smollm2   # PPO's separate critic
    python benchmarks/critic.py --preset smoke --out /tmp/critic_smoke      # tiny, 2 steps, 1 seed: the plumbing

Every run is an ordinary `creditlab train` run (its config.json holds the exact settings); runs already finished are
skipped and interrupted ones resume, so rerunning the command only does what is missing. Layout of --out:
runs/<method>/seed<k>/ (trainer run dirs), results/<method>/seed<k>.jsonl|.json, env.json, report.md, curves.png.

The full preset is the README's SmolLM2 recipe (one-digit chain_sum, 8 prompts x 4 samples, 40 new tokens, lr 1e-5,
bf16 sampling and update, 30 steps): GRPO runs it as written; PPO (`gae`, verl's gamma = lam = 1 and whitening),
`ma_rlhf` (fixed n = 5, equal) and `poad` add `--critic head` (or --critic). chain_sum responses carry no oracle
step spans, so POAD's actions there are turns (`poad_turns`: a single-turn response is one action, which makes it
token-level GAE with gamma = 1 inside); `--task arith_chain` has step spans and runs `poad` over steps.
Wall-clock = the summed `time/step` (rollout + signals + critic + update; evaluations excluded); critic share =
summed `time/critic` / summed `time/step`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from creditlab.bench.learning import environment, read_rows, run_one
from creditlab.train.config import (
    CriticConfig,
    EvalConfig,
    LogConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
)


@dataclass(frozen=True)
class Preset:
    task: str
    task_kwargs: str
    policy: str
    seeds: int
    steps: int
    prompts_per_step: int
    group_size: int
    max_new_tokens: int
    lr: float
    bf16: bool
    eval_every: int
    eval_problems: int


PRESETS = {
    "full": Preset("chain_sum", '{"digits": 1, "terms": 2}', "smollm2", seeds=3, steps=30, prompts_per_step=8,
                   group_size=4, max_new_tokens=40, lr=1e-5, bf16=True, eval_every=5, eval_problems=128),
    "smoke": Preset("arith_chain", '{"n_steps": 2}', "tiny", seeds=1, steps=2, prompts_per_step=3, group_size=4,
                    max_new_tokens=16, lr=1e-3, bf16=False, eval_every=2, eval_problems=4),
}
# method -> (estimator, estimator kwargs, needs a critic)
METHODS: dict[str, tuple[str, str, bool]] = {
    "grpo": ("grpo", '{"eps": 1e-4}', False),
    "ppo_gae": ("gae", "{}", True),
    "ma_rlhf": ("ma_rlhf", "{}", True),
    "poad": ("poad", "{}", True),
}
TASKS_WITH_STEPS = ("arith_chain",)  # tasks whose verifier gives step spans (step_ids for `poad`)


def run_config(p: Preset, method: str, seed: int, run_dir: Path, critic: CriticConfig, progress: bool) -> TrainConfig:
    estimator, kwargs, needs_critic = METHODS[method]
    if estimator == "poad" and p.task not in TASKS_WITH_STEPS:
        estimator = "poad_turns"
    return TrainConfig(
        run=RunConfig(task=p.task, task_kwargs=p.task_kwargs, policy=p.policy, estimator=estimator,
                      estimator_kwargs=kwargs, out_dir=str(run_dir), seed=seed, steps=p.steps),
        rollout=RolloutConfig(prompts_per_step=p.prompts_per_step, group_size=p.group_size,
                              max_new_tokens=p.max_new_tokens, bf16=p.bf16),
        optim=OptimConfig(lr=p.lr, update_bf16=p.bf16),
        eval=EvalConfig(eval_every=p.eval_every, eval_problems=p.eval_problems),
        log=LogConfig(checkpoint_every=p.eval_every, tensorboard=False, progress=progress, sample_every=0),
        critic=critic if needs_critic else CriticConfig(),
    )


# ------------------------------------------------------------------------------------------------ summaries
def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Curves and totals of one run's metrics.jsonl rows."""
    steps = [r for r in rows if r["step"] > 0]
    wall = np.cumsum([r.get("time/step", 0.0) for r in steps]).tolist()
    evals = [(r["step"], r.get("samples", 0), ([0.0, *wall])[r["step"]], r["eval/accuracy"])
             for r in rows if "eval/accuracy" in r]
    step_s = sum(r.get("time/step", 0.0) for r in steps)
    critic_s = sum(r.get("time/critic", 0.0) for r in steps)
    return {"evals": evals, "ev": [(r["step"], r["critic/explained_variance"]) for r in steps
                                   if "critic/explained_variance" in r],
            "final": evals[-1][3] if evals else float("nan"), "initial": evals[0][3] if evals else float("nan"),
            "train_s": step_s, "s_per_step": step_s / max(len(steps), 1),
            "critic_share": critic_s / step_s if step_s else 0.0}


def _ms(xs: list[float], fmt: str = "{:.3f}") -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "—"
    return fmt.format(np.mean(xs)) + (f" ± {fmt.format(np.std(xs, ddof=1))}" if len(xs) > 1 else "")


def report(per_method: dict[str, list[dict[str, Any]]], p: Preset, critic: CriticConfig, env: dict[str, Any]) -> str:
    lines = [f"# Critic benchmark ({p.task} {p.task_kwargs}, {p.policy})", "",
             f"{p.steps} steps x {p.prompts_per_step} prompts x {p.group_size} samples, max {p.max_new_tokens} "
             f"tokens, lr {p.lr:g}, bf16 {p.bf16}; critic `{critic.critic}` (lr {critic.critic_lr:g}, coef "
             f"{critic.critic_coef:g}, clip {critic.critic_clip}); git {env['git_commit'][:10]}"
             f"{' (dirty)' if env.get('git_dirty') else ''}, {env['threads']} torch threads. Mean ± std over seeds.",
             "", "| method | runs | held-out acc start | final | mean EV (last 5 steps) | s/step | critic share of "
             "step time | train s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, runs in per_method.items():
        ev = [float(np.mean([e for _, e in r["ev"][-5:]])) for r in runs if r["ev"]]
        col = lambda key, fmt="{:.3f}", runs=runs: _ms([r[key] for r in runs], fmt)  # noqa: E731
        lines.append(f"| {method} | {len(runs)} | {col('initial')} | {col('final')} | {_ms(ev)} | "
                     f"{col('s_per_step', '{:.1f}')} | {col('critic_share', '{:.2f}')} | {col('train_s', '{:.0f}')} |")
    lines += ["", "A difference smaller than the std across seeds is within noise; 3 seeds detect only large effects."]
    return "\n".join(lines) + "\n"


def plot(per_method: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for method, runs in per_method.items():
        for i, r in enumerate(runs):
            kw = {"label": method if i == 0 else None, "alpha": 0.8, "color": f"C{list(per_method).index(method)}"}
            axes[0].plot([e[1] for e in r["evals"]], [e[3] for e in r["evals"]], **kw)
            axes[1].plot([e[2] for e in r["evals"]], [e[3] for e in r["evals"]], **kw)
            if r["ev"]:
                axes[2].plot([s for s, _ in r["ev"]], [e for _, e in r["ev"]], **kw)
    for ax, xl, yl in zip(axes, ("samples", "train seconds (critic included)", "step"),
                          ("held-out accuracy", "held-out accuracy", "critic explained variance")):
        ax.set_xlabel(xl)
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
    axes[2].set_ylim(-1.05, 1.05)  # EV below -1 (returns that barely vary) is off the chart
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--task", default="", help="override the preset's task (e.g. arith_chain: poad over steps)")
    parser.add_argument("--task-kwargs", default="", help="override the preset's task kwargs (JSON)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--seeds", type=int, default=0, help="seeds 0..N-1 (default: the preset's)")
    parser.add_argument("--steps", type=int, default=0, help="RL steps (default: the preset's)")
    parser.add_argument("--critic", default="head", help="head or model:<policy> for the critic methods")
    parser.add_argument("--critic-lr", type=float, default=1e-3)
    parser.add_argument("--critic-coef", type=float, default=0.1)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    p = PRESETS[args.preset]
    from dataclasses import replace

    p = replace(p, task=args.task or p.task, task_kwargs=args.task_kwargs or p.task_kwargs,
                seeds=args.seeds or p.seeds, steps=args.steps or p.steps)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    critic = CriticConfig(critic=args.critic, critic_lr=args.critic_lr, critic_coef=args.critic_coef)
    critic.validate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "preset": args.preset, "settings": p.__dict__, "critic": critic.__dict__}
    (out / "env.json").write_text(json.dumps(env, indent=2))
    per_method: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        for seed in range(p.seeds):
            cfg = run_config(p, method, seed, out / "runs" / method / f"seed{seed}", critic, args.progress)
            result = out / "results" / method / f"seed{seed}.jsonl"
            print(f"{method} seed {seed}: {run_one(cfg, result)}", file=sys.stderr)
            per_method.setdefault(method, []).append(summarize(read_rows(result)))
    text = report(per_method, p, critic, env)
    (out / "report.md").write_text(text)
    plot(per_method, out / "curves.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
