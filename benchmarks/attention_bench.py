"""Attention preplan/anchor credit (attn_local, attn_global, attn_coupled) vs GRPO on SmolLM2, >= 3 seeds.

    python benchmarks/attention_bench.py --seeds 3 --steps 30 --out runs/bench-attention      # the measurement
    python benchmarks/attention_bench.py --seeds 1 --steps 1 --eval-problems 4 --out /tmp/ab  # smoke

Same runner and report as `benchmarks/budget_bench.py` (ordinary `creditlab train` runs, resumable, mean ± std over
seeds, a noise line per method), with the attention methods at the paper's defaults (gamma_amp 1.5, q 0.4, W 10,
H [10, 100], middle-third layers, signed scaling) plus the per-step cost of the attention pass (`time/attn_signal`
over `time/step`) and where selection lands (`credit/attn_selected_punct_frac` vs `credit/attn_punct_frac`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from budget_bench import add_common_args, report, run_all, select

METHODS: dict[str, list[str]] = {
    "grpo": ["--estimator", "grpo", "--estimator-kwargs", '{"eps": 1e-4}'],
    "attn_local": ["--estimator", "attn_local", "--estimator-kwargs", '{"eps": 1e-4}'],
    "attn_global": ["--estimator", "attn_global", "--estimator-kwargs", '{"eps": 1e-4}'],
    "attn_coupled": ["--estimator", "attn_coupled", "--estimator-kwargs", '{"eps": 1e-4}'],
}


def attention_costs(results: dict) -> list[str]:
    lines = ["", "Attention pass (mean over steps and seeds):", "",
             "| method | attn s/step | share of step | selected punct. share | punct. share of tokens |",
             "|---|---:|---:|---:|---:|"]
    for name, runs in results.items():
        steps = [r for run in runs for r in run[1:] if "time/attn_signal" in r]
        if not steps:
            continue
        mean = statistics.mean
        lines.append(f"| {name} | {mean(r['time/attn_signal'] for r in steps):.2f} | "
                     f"{mean(r['time/attn_signal'] / r['time/step'] for r in steps):.3f} | "
                     f"{mean(r['credit/attn_selected_punct_frac'] for r in steps):.3f} | "
                     f"{mean(r['credit/attn_punct_frac'] for r in steps):.3f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(p)
    p.set_defaults(out="runs/bench-attention")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = select(METHODS, args.methods)
    results = run_all(args, methods)
    report(args, results, "Attention credit vs GRPO", methods)
    extra = attention_costs(results)
    with open(Path(args.out) / "report.md", "a") as f:
        f.write("\n".join(extra) + "\n")
    print("\n".join(extra))


if __name__ == "__main__":
    main()
