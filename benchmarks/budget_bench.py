"""Budget credit vs GRPO on SmolLM2: anytime accuracy (area under accuracy-vs-budget), length, accuracy.

    python benchmarks/budget_bench.py --seeds 3 --steps 30 --out runs/bench-budget          # the measurement
    python benchmarks/budget_bench.py --seeds 1 --steps 1 --eval-problems 4 --out /tmp/bb   # smoke (~5 min CPU)

Every run is an ordinary `creditlab train` run (subprocess; its config.json reproduces it) of SmolLM2-135M-Instruct
on `--task` with the README's SmolLM2 recipe settings (8 prompts x 4 samples, lr 1e-5, bf16 sampling and update)
and `--budgets`, so every method is evaluated at every budget (greedy answer after the cut, `eval/acc@<b>`).
Methods: grpo, brpo (budget cuts + summary tokens), hbpo (budget-prefixed prompts; l_max = --max-new-tokens),
vsrm (step cuts; newline steps). Resumable: finished runs are skipped, checkpointed runs resume.

Report (`<out>/report.md`, `<out>/anytime.png`): per method, mean +- std over seeds of the final held-out accuracy,
anytime AUC (mean accuracy over the budgets = normalised area under the step curve), greedy response length on
the held-out set, training response length (mean of the last 5 steps), and all samples generated (extra samples
of truncate-and-answer included). Differences smaller than the seeds' spread are within noise; the report says so.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_METHODS: dict[str, list[str]] = {
    "grpo": ["--estimator", "grpo", "--estimator-kwargs", '{"eps": 1e-4}'],
    "brpo": ["--estimator", "brpo"],
    # brpo's credit on the thinking tokens only: the summary answers are sampled and scored but not trained (the
    # reference trains them; their update costs ~6x a GRPO update on SmolLM2, too slow for 2 CPU cores)
    "brpo_nosum": ["--estimator", "brpo", "--no-budget-summary-loss"],
    "hbpo": ["--estimator", "hbpo"],  # l_max filled in from --max-new-tokens
    "vsrm": ["--estimator", "vsrm", "--budget-step-split", "newline"],
}


def base_args(args: argparse.Namespace) -> list[str]:
    return ["--task", args.task, "--task-kwargs", args.task_kwargs, "--policy", args.policy,
            "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step),
            "--group-size", str(args.group_size), "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr),
            "--bf16", "--update-bf16", "--eval-every", str(args.eval_every), "--eval-problems", str(args.eval_problems),
            "--checkpoint-every", str(args.eval_every), "--budgets", args.budgets, "--no-tensorboard",
            "--no-progress", "--sample-every", "10", *args.extra]


def method_args(name: str, extra: list[str], args: argparse.Namespace) -> list[str]:
    if name == "hbpo" and "--estimator-kwargs" not in extra:
        return [*extra, "--estimator-kwargs", json.dumps({"l_max": args.max_new_tokens})]
    return extra


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x] if path.exists() else []


def run_all(args: argparse.Namespace, methods: dict[str, list[str]]) -> dict[str, list[list[dict[str, Any]]]]:
    out = Path(args.out)
    results: dict[str, list[list[dict[str, Any]]]] = {}
    for name, extra in methods.items():
        for seed in range(args.seeds):
            run_dir = out / "runs" / name / f"seed{seed}"
            rows = read_rows(run_dir)
            if not (rows and rows[-1]["step"] == args.steps and "eval/accuracy" in rows[-1]):
                cmd = [sys.executable, "-m", "creditlab.cli", "train", *base_args(args),
                       *method_args(name, extra, args), "--seed", str(seed), "--out-dir", str(run_dir)]
                if (run_dir / "latest").exists():
                    cmd.append("--resume")
                t0 = time.time()
                print(f"[{name} seed {seed}] {shlex.join(cmd[3:])}", flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                print(f"[{name} seed {seed}] {time.time() - t0:.0f} s", flush=True)
                rows = read_rows(run_dir)
            results.setdefault(name, []).append(rows)
    return results


def _ms(xs: list[float]) -> str:
    if not xs:
        return "-"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def summarize(results: dict[str, list[list[dict[str, Any]]]], budgets: list[int]) -> tuple[str, dict[str, Any]]:
    cols = ["accuracy", "anytime AUC", *[f"acc@{b}" for b in budgets], "eval length", "train length", "samples"]
    lines = ["| method | seeds | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    data: dict[str, Any] = {}
    for name, runs in results.items():
        finals = [r[-1] for r in runs if r]
        first = [r[0] for r in runs if r]
        train_len = [statistics.mean(x["response/length"] for x in [y for y in r if "response/length" in y][-5:])
                     for r in runs if any("response/length" in y for y in r)]
        samples = [float(f.get("samples", 0)) for f in finals]
        row = {"accuracy": [f["eval/accuracy"] for f in finals],
               "anytime AUC": [f.get("eval/anytime_auc", float("nan")) for f in finals],
               **{f"acc@{b}": [f.get(f"eval/acc@{b}", float("nan")) for f in finals] for b in budgets},
               "eval length": [f.get("eval/length", float("nan")) for f in finals], "train length": train_len,
               "samples": samples, "initial accuracy": [f["eval/accuracy"] for f in first]}
        data[name] = row
        lines.append(f"| {name} | {len(finals)} | " + " | ".join(_ms(row[c]) for c in cols) + " |")
    return "\n".join(lines), data


def noise_notes(data: dict[str, Any], ref: str = "grpo") -> list[str]:
    """One line per method and key metric: is the difference to `ref` larger than the seeds' spread?"""
    notes = []
    if ref not in data:
        return notes
    for name, row in data.items():
        if name == ref:
            continue
        for key in ("accuracy", "anytime AUC", "eval length"):
            a, b = row[key], data[ref][key]
            if len(a) < 2 or len(b) < 2:
                notes.append(f"- {name} vs {ref}, {key}: fewer than 2 seeds, no noise estimate")
                continue
            diff = statistics.mean(a) - statistics.mean(b)
            spread = max(statistics.stdev(a), statistics.stdev(b))
            verdict = "larger than" if abs(diff) > spread else "within"
            notes.append(f"- {name} vs {ref}, {key}: {diff:+.3f}, {verdict} the seeds' spread ({spread:.3f})")
    return notes


def report(args: argparse.Namespace, results: dict[str, list[list[dict[str, Any]]]], title: str,
           methods: dict[str, list[str]]) -> None:
    from creditlab.signals.budget import parse_budgets
    from creditlab.viz.plots import plot_anytime

    out = Path(args.out)
    budgets = parse_budgets(args.budgets)
    table, data = summarize(results, budgets)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    finals = {name: [r[-1] for r in runs if r] for name, runs in results.items()}
    try:
        plot_anytime(finals, out / "anytime.png", title=f"{args.task} {args.task_kwargs}")
        plot_line = "![anytime accuracy](anytime.png)"
    except ValueError as e:
        plot_line = f"(no anytime plot: {e})"
    text = [f"# {title}", "", f"commit `{commit}`; command: `python {shlex.join(sys.argv)}`", "",
            f"Base run: `creditlab train {shlex.join(base_args(args))}` + per-method options "
            f"`{json.dumps({n: method_args(n, e, args) for n, e in methods.items()})}`.", "",
            "Final held-out evaluation (greedy), mean ± std over seeds:", "", table, "", plot_line, "",
            "Noise:", *noise_notes(data), ""]
    (out / "report.md").write_text("\n".join(text))
    (out / "summary.json").write_text(json.dumps(data, indent=2))
    print("\n".join(text))


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--task", default="chain_sum")
    p.add_argument("--task-kwargs", default='{"digits": 1, "terms": 3}')
    p.add_argument("--policy", default="smollm2")
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--budgets", default="16,32,48,64")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-problems", type=int, default=128)
    p.add_argument("--methods", default="", help="comma-separated subset of the suite's methods")
    p.add_argument("--out", default="runs/bench-budget")
    p.add_argument("extra", nargs="*", help="more `creditlab train` options for every run (after --)")


def select(methods: dict[str, list[str]], names: str) -> dict[str, list[str]]:
    if not names:
        return methods
    unknown = [n for n in names.split(",") if n not in methods]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; valid: {list(methods)}")
    return {n: methods[n] for n in names.split(",")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = select(DEFAULT_METHODS, args.methods)
    from creditlab.signals.budget import parse_budgets

    if "hbpo" in methods and args.group_size % len(parse_budgets(args.budgets)):
        raise SystemExit(f"hbpo needs --group-size ({args.group_size}) to be a multiple of the number of budgets "
                         f"({args.budgets})")
    report(args, run_all(args, methods), "Budget credit vs GRPO", methods)


if __name__ == "__main__":
    main()
