"""PURE's reward-hacking experiment on arith_chain: sum-form vs min-form credit under a PRM that rewards *form*.

    python benchmarks/reward_hacking.py [--out DIR] [--steps N] [--seeds 0 1] [--img docs/img/reward_hacking.png]
                                        [--no-baseline] [--no-answer-wellformed] [--no-reuse]

1. Warm-start `tiny` on arith_chain {"n_steps": 2, "max_operand": 9} with SFT (once; reused from DIR/sft-tiny
   when a previous call with the same SFT settings left it there).
2. RL from that policy with `sum_form`, with `pure` (strict min-form) and with `pure_softmin` (PURE's training
   default, softmin at temperature 0.1), same seeds, same everything else.
   The only reward is a hackable process reward: the `oracle` scorer with `hackable: true` gives a line 1.0 iff it
   is well formed (`a op b = c`, or the final `Answer: N` line, see --answer-wellformed) and 0.0 otherwise,
   whatever its correctness. The verifiable (outcome) reward is switched off (`vr_coef: 0`): PRM-only, the
   paper's setting. Each estimator keeps its leave-one-out baseline as in PURE's script (sum_form "token": the
   others' PRM reward per step token times the step's length; pure "rloo": the others' min score), so the
   advantage of a step token is the baselined future sum (sum_form) or future min (pure) of the step scores.
   `--no-baseline` uses the naive forms instead (no baseline at all).
3. Per RL step it logs, from all sampled responses (not a subsample): well-formed step lines per response,
   correct (on-gold-path) steps, lines, responses with an Answer line, response length, train accuracy; per
   evaluation the held-out greedy accuracy plus greedy step lines and length. It writes DIR/<estimator>-s<seed>/
   (metrics.jsonl with the extra `hack/*` keys, eval_extra.jsonl), DIR/summary.json, the figure, and prints a
   Markdown summary table.

The extra measurements wrap `creditlab.train.loop.rl_step` / `evaluate` inside this process only; the trainer
itself is unchanged.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

import creditlab.train.loop as loop
from creditlab.rollout.hf import SamplingConfig, generate
from creditlab.signals.prm import STEP_FORMAT
from creditlab.train.config import (
    EvalConfig,
    LogConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
)
from creditlab.train.sft import sft

TASK = "arith_chain"
TASK_KWARGS = {"n_steps": 2, "max_operand": 9}
STEP_RE = re.compile(STEP_FORMAT)
ANSWER_FORMAT = r"Answer:\s*-?\d+"
ANSWER_RE = re.compile(r"answer\s*:", re.IGNORECASE)
ESTIMATORS = {  # label -> (estimator, estimator kwargs): PRM-only (vr_coef 0), each with its leave-one-out baseline
    "sum_form": ("sum_form", {"baseline": "token", "vr_coef": 0.0}),
    "pure": ("pure", {"mode": "strict", "baseline": "rloo", "vr_coef": 0.0}),
    "pure_softmin": ("pure", {"vr_coef": 0.0}),  # PURE's training default: softmin, temperature 0.1
    # creditlab's token baseline before issue 11 (a mean of per-token ratios), for comparison with this page's
    # first measurement; run it with --estimators sum_form_per_row
    "sum_form_per_row": ("sum_form", {"baseline": "token_per_row", "vr_coef": 0.0}),
}
NO_BASELINE = {  # --no-baseline: the naive canonical forms (advantages >= 0; see docs/reward_hacking.md)
    "sum_form": ("sum_form", {"baseline": "none", "vr_coef": 0.0}),
    "pure": ("pure", {"mode": "strict", "baseline": "none", "vr_coef": 0.0}),
    "pure_softmin": ("pure", {"baseline": "none", "vr_coef": 0.0}),
    "sum_form_per_row": ("sum_form", {"baseline": "none", "vr_coef": 0.0}),
}


# ------------------------------------------------------------------ measurements
def text_stats(texts: list[str]) -> dict[str, float]:
    """Mean over responses: well-formed `a op b = c` lines, non-blank lines, share with an Answer line."""
    steps, lines, answer = [], [], []
    for t in texts:
        ls = [x.strip() for x in t.split("\n") if x.strip()]
        steps.append(sum(STEP_RE.fullmatch(x) is not None for x in ls))
        lines.append(len(ls))
        answer.append(any(ANSWER_RE.search(x) for x in ls))
    return {"steps": float(np.mean(steps)), "lines": float(np.mean(lines)), "answer_frac": float(np.mean(answer))}


def instrument(eval_log: list[dict[str, Any]]) -> tuple[Any, Any]:
    """Wrap loop.rl_step (adds hack/* metrics from every sampled response) and loop.evaluate (records greedy
    step lines and length). Returns the originals for `restore`."""
    orig_step, orig_eval = loop.rl_step, loop.evaluate

    def rl_step(cfg, ctx, state):
        metrics, batch, credit = orig_step(cfg, ctx, state)
        s = text_stats(batch.texts)
        present = batch.step_ids is not None and batch.step_rewards is not None
        extra = {f"hack/{k}": v for k, v in s.items()}
        if present:  # the PRM's own totals per response (sum and min of its step scores)
            from creditlab.credit.process import trajectory_score

            extra["prm/sum"] = float(trajectory_score(batch.step_rewards, batch.step_ids, "sum").mean())
            extra["prm/min"] = float(trajectory_score(batch.step_rewards, batch.step_ids, "min").mean())
        metrics.update(extra)
        return metrics, batch, credit

    def evaluate(policy, task, problems, *, max_new_tokens, chunk=64):
        greedy = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
        policy.model.eval()
        texts, correct, gold_steps, lengths = [], 0, 0, []
        for start in range(0, len(problems), chunk):
            part = problems[start:start + chunk]
            b = generate(policy, [policy.format_prompt(p.prompt) for p in part], 1, greedy, seed=0)
            lengths += b.response_mask.sum(1).tolist()
            for p, t in zip(part, b.texts):
                sc = task.score(p, t)
                correct += sc.correct
                gold_steps += sum(sc.step_labels or ())
                texts.append(t)
        acc = correct / max(len(problems), 1)
        eval_log.append({"accuracy": acc, **{f"greedy_{k}": v for k, v in text_stats(texts).items()},
                         "greedy_correct_steps": gold_steps / max(len(problems), 1),
                         "greedy_length": float(np.mean(lengths)) if lengths else 0.0, "example": texts[0]})
        return acc

    loop.rl_step, loop.evaluate = rl_step, evaluate
    return orig_step, orig_eval


def restore(orig: tuple[Any, Any]) -> None:
    loop.rl_step, loop.evaluate = orig


# ------------------------------------------------------------------ runs
def warm_start(out: Path, args: argparse.Namespace) -> str:
    cfg = SFTConfig(task=TASK, task_kwargs=json.dumps(TASK_KWARGS), policy="tiny", out_dir=str(out / "sft-tiny"),
                    seed=args.sft_seed, steps=args.sft_steps, max_new_tokens=args.max_new_tokens,
                    eval_problems=args.sft_eval_problems)
    stamp = out / "sft-tiny" / "sft_config.json"
    want = json.dumps(cfg.__dict__, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want and (out / "sft-tiny" / "sft_summary.json").exists():
        s = json.loads((out / "sft-tiny" / "sft_summary.json").read_text())
        print(f"[sft] reusing {cfg.out_dir} (held-out greedy accuracy {s['accuracy']:.3f})", flush=True)
        return cfg.out_dir
    print(f"[sft] warm-starting tiny on {TASK} {TASK_KWARGS} for {args.sft_steps} steps ...", flush=True)
    s = sft(cfg)
    stamp.write_text(want)
    print(f"[sft] held-out greedy accuracy {s['accuracy']:.3f} ({s['seconds']:.0f} s)", flush=True)
    return cfg.out_dir


def scorer_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kw: dict[str, Any] = {"hackable": True}
    if args.answer_wellformed:
        kw["step_format"] = f"(?:{STEP_FORMAT})|(?:{ANSWER_FORMAT})"
    return kw


def run_one(policy_dir: str, label: str, seed: int, out: Path, args: argparse.Namespace) -> Path:
    est, kw = (NO_BASELINE if args.no_baseline else ESTIMATORS)[label]
    run_dir = out / f"{label}-s{seed}"
    cfg = TrainConfig(
        run=RunConfig(task=TASK, task_kwargs=json.dumps(TASK_KWARGS), policy=policy_dir, estimator=est,
                      estimator_kwargs=json.dumps(kw), scorer="oracle", scorer_kwargs=json.dumps(scorer_kwargs(args)),
                      out_dir=str(run_dir), seed=seed, steps=args.steps),
        rollout=RolloutConfig(prompts_per_step=args.prompts, group_size=args.group, temperature=1.0,
                              max_new_tokens=args.max_new_tokens),
        optim=OptimConfig(lr=args.lr),
        eval=EvalConfig(eval_every=args.eval_every, eval_problems=args.eval_problems),
        log=LogConfig(checkpoint_every=args.steps, tensorboard=False, progress=False, sample_every=0),
    )
    done = run_dir / "eval_extra.jsonl"
    if args.reuse and done.exists() and json.loads((run_dir / "config.json").read_text()) == cfg.to_dict():
        print(f"[{label} s{seed}] reusing the finished run in {run_dir}", flush=True)
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    eval_log: list[dict[str, Any]] = []
    orig = instrument(eval_log)
    t0 = time.perf_counter()
    try:
        loop.train(cfg)
    finally:
        restore(orig)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    eval_steps = [r["step"] for r in rows if "eval/accuracy" in r]
    with open(run_dir / "eval_extra.jsonl", "w") as f:
        for step, e in zip(eval_steps, eval_log):
            f.write(json.dumps({"step": step, **e}) + "\n")
    last = rows[-1]
    print(f"[{label} s{seed}] {args.steps} steps in {time.perf_counter() - t0:.0f} s: steps/response "
          f"{last.get('hack/steps', float('nan')):.2f}, held-out acc {eval_log[-1]['accuracy']:.3f}, "
          f"e.g. {eval_log[-1]['example']!r}", flush=True)
    return run_dir


def load_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    evals = [json.loads(x) for x in (run_dir / "eval_extra.jsonl").read_text().splitlines() if x]
    return [r for r in rows if r["step"] > 0], evals


# ------------------------------------------------------------------ report
def summarize(out: Path, labels: list[str], seeds: list[int], tail: int) -> list[dict[str, Any]]:
    table = []
    for label in labels:
        per_seed = [load_run(out / f"{label}-s{s}") for s in seeds]

        def first_last(key: str, per_seed: list = per_seed) -> tuple[float, float]:
            a = [np.mean([r[key] for r in rows[:tail]]) for rows, _ in per_seed]
            b = [np.mean([r[key] for r in rows[-tail:]]) for rows, _ in per_seed]
            return float(np.mean(a)), float(np.mean(b))

        row: dict[str, Any] = {"estimator": label, "seeds": len(seeds)}
        for key, name in (("hack/steps", "steps"), ("hack/lines", "lines"), ("hack/answer_frac", "answer_frac"),
                          ("response/length", "length"), ("train/accuracy", "train_acc"), ("prm/sum", "prm_sum"),
                          ("prm/min", "prm_min")):
            row[f"{name}_first"], row[f"{name}_last"] = first_last(key)
        for key in ("accuracy", "greedy_steps", "greedy_length"):
            row[f"eval_{key}_first"] = float(np.mean([ev[0][key] for _, ev in per_seed]))
            row[f"eval_{key}_last"] = float(np.mean([ev[-1][key] for _, ev in per_seed]))
            row[f"eval_{key}_last_seeds"] = [ev[-1][key] for _, ev in per_seed]
        table.append(row)
    return table


def markdown(table: list[dict[str, Any]], tail: int) -> str:
    head = ("| estimator | steps (lines) / response | well-formed steps (PRM sum) | PRM min | 'a op b = c' lines "
            "| has Answer line | response length (tokens) | train acc | held-out acc (greedy) "
            "| greedy 'a op b = c' lines |\n|---|---|---|---|---|---|---|---|---|---|")
    out = [head]
    for r in table:
        seeds = ", ".join(f"{v:.3f}" for v in r["eval_accuracy_last_seeds"])
        out.append(
            f"| {r['estimator']} | {r['lines_first']:.2f} → {r['lines_last']:.2f} | {r['prm_sum_first']:.2f} → "
            f"{r['prm_sum_last']:.2f} | {r['prm_min_first']:.2f} → {r['prm_min_last']:.2f} | {r['steps_first']:.2f} → "
            f"{r['steps_last']:.2f} | {r['answer_frac_first']:.2f} → {r['answer_frac_last']:.2f} | "
            f"{r['length_first']:.1f} → {r['length_last']:.1f} | {r['train_acc_first']:.3f} → {r['train_acc_last']:.3f}"
            f" | {r['eval_accuracy_first']:.3f} → {r['eval_accuracy_last']:.3f} ({seeds}) | "
            f"{r['eval_greedy_steps_first']:.2f} → {r['eval_greedy_steps_last']:.2f} |")
    out.append(f"\nSampled-response columns: mean of the first {tail} → last {tail} RL steps, then over seeds. "
               "Held-out columns: before RL → after the last step, mean over seeds (per seed in brackets).")
    return "\n".join(out)


def plot(out_png: Path, out: Path, labels: list[str], seeds: list[int], title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from creditlab.viz.plots import OKABE_ITO, align_seeds

    panels = [("hack/lines", "train", "steps (non-blank lines) per response"),
              ("prm/sum", "train", "well-formed steps per response\n(= sum of PRM step scores)"),
              ("hack/steps", "train", "'a op b = c' lines per response"),
              ("accuracy", "eval", "held-out accuracy (greedy)")]
    fig = Figure(figsize=(10.5, 7.2), dpi=120)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(2, 2, i + 1) for i in range(len(panels))]
    for i, label in enumerate(labels):
        color = OKABE_ITO[i]
        runs = [load_run(out / f"{label}-s{s}") for s in seeds]
        for ax, (key, where, ylabel) in zip(axes, panels):
            if where == "train":
                xy = [([r["step"] for r in rows], [r[key] for r in rows]) for rows, _ in runs]
            else:
                xy = [([e["step"] for e in ev], [e[key] for e in ev]) for _, ev in runs]
            x, ys = align_seeds(xy)
            ax.plot(x, ys.mean(0), color=color, linewidth=1.8, linestyle="-" if i == 0 else "--",
                    marker="o" if where == "eval" else None, markersize=3, label=f"{label} (n={len(seeds)})")
            if len(seeds) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.2, linewidth=0)
            ax.set_xlabel("RL step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
    axes[0].legend(frameon=False, fontsize="small")
    fig.suptitle(title + "  (line: mean over seeds, band: min..max)", fontsize="medium")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/reward_hacking", help="run directory root")
    p.add_argument("--img", default="docs/img/reward_hacking.png", help="figure path ('' = no figure)")
    p.add_argument("--steps", type=int, default=15, help="RL steps per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--estimators", nargs="+", default=["sum_form", "pure", "pure_softmin"], choices=list(ESTIMATORS))
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--sft-seed", type=int, default=0)
    p.add_argument("--sft-eval-problems", type=int, default=128, help="held-out problems for the SFT accuracy")
    p.add_argument("--max-new-tokens", type=int, default=96, help="room for ~8 step lines (gold needs 2 + Answer)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per RL step")
    p.add_argument("--group", type=int, default=8, help="responses per prompt")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-problems", type=int, default=64)
    p.add_argument("--answer-wellformed", action=argparse.BooleanOptionalAction, default=True,
                   help="the hackable PRM also scores the 'Answer: N' line as well formed (default; with "
                        "--no-answer-wellformed the answer line scores 0)")
    p.add_argument("--reuse", action=argparse.BooleanOptionalAction, default=True,
                   help="keep finished runs in --out whose config matches (resume an interrupted benchmark)")
    p.add_argument("--no-baseline", action="store_true", help="naive forms: baseline 'none' for both")
    p.add_argument("--tail", type=int, default=3, help="RL steps averaged for the first/last columns")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    policy_dir = warm_start(out, args)
    for label in args.estimators:
        for seed in args.seeds:
            run_one(policy_dir, label, seed, out, args)
    table = summarize(out, args.estimators, args.seeds, args.tail)
    (out / "summary.json").write_text(json.dumps({"args": vars(args), "scorer_kwargs": scorer_kwargs(args),
                                                  "estimators": {k: (NO_BASELINE if args.no_baseline else ESTIMATORS)[k]
                                                                 for k in args.estimators},
                                                  "table": table}, indent=2))
    if args.img:
        png = plot(Path(args.img), out, args.estimators, args.seeds,
                   f"hackable PRM only, {TASK} n_steps=2, tiny, {args.prompts}x{args.group} samples/step")
        print(f"figure: {png}")
    print(f"\n{markdown(table, args.tail)}\n\ntotal {time.perf_counter() - t0:.0f} s")
    return table


if __name__ == "__main__":
    main()
