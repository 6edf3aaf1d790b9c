"""Summarise several `benchmarks/vs_trl.py` records (one per seed): speed ratios and paired accuracy.

    python benchmarks/vs_trl_summary.py benchmarks/results/vs_trl_fp32_avx2_seed*.json
    python benchmarks/vs_trl_summary.py --pair bf16 benchmarks/results/vs_trl_bf16_seed*.json

For one precision pair (`--pair`, default fp32) prints a markdown table with one row per record (seed, samples/s
of both sides, their ratio, peak memory ratio, held-out accuracy of both at every evaluated step) and, over the
records, the mean ± sample std of the ratio and of the paired accuracy difference creditlab − TRL at each step
that every record evaluated. Reads JSON only; needs neither TRL nor torch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def mean_std(xs: list[float], signed: bool = False) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):{'+' if signed else ''}.3f} ± {sd:.3f}"


def curve(side: dict[str, Any]) -> dict[int, float]:
    """step -> accuracy; records written before `--eval-every` existed have only the start and the end."""
    acc = {int(k): float(v) for k, v in (side.get("accuracy_at") or {}).items() if v is not None}
    if side.get("initial_accuracy") is not None:
        acc.setdefault(0, float(side["initial_accuracy"]))
    acc.setdefault(int(side["steps"]), float(side["final_accuracy"]))
    return acc


def summarise(records: list[tuple[str, dict[str, Any]]], pair: str) -> str:
    rows, ratios, curves = [], [], []
    for name, rep in records:
        if pair not in rep.get("pairs", {}):
            raise SystemExit(f"{name}: no '{pair}' pair in this record (has: {', '.join(rep.get('pairs', {}))})")
        r = rep["pairs"][pair]
        cl, tr = curve(r["creditlab"]), curve(r["trl"])
        ratios.append(float(r["ratio_samples_per_s"]))
        curves.append((cl, tr))
        steps = sorted(set(cl) & set(tr))
        acc = ", ".join(f"{s}: {cl[s]:.3f} vs {tr[s]:.3f}" for s in steps)
        rows.append(f"| {rep['meta']['seed']} | {r['creditlab']['samples_per_s']:.2f} | "
                    f"{r['trl']['samples_per_s']:.2f} | {r['ratio_samples_per_s']:.2f}× | {r['peak_mb_ratio']:.2f}× | "
                    f"{acc} |")
    common = sorted(set.intersection(*(set(cl) & set(tr) for cl, tr in curves)))
    diffs = {s: [cl[s] - tr[s] for cl, tr in curves] for s in common}
    out = ["| seed | creditlab samples/s | TRL samples/s | ratio | peak memory ratio | held-out accuracy by step, "
           "creditlab vs TRL |", "|---:|---:|---:|---:|---:|---|", *rows, "",
           f"samples/s ratio over {len(records)} records: {mean_std(ratios)} (min {min(ratios):.2f}×, "
           f"max {max(ratios):.2f}×)", ""]
    out += ["| step | creditlab mean ± std | TRL mean ± std | creditlab − TRL (paired) | creditlab ahead / level / "
            "behind |", "|---:|---:|---:|---:|---|"]
    for s in common:
        d = diffs[s]
        out.append(f"| {s} | {mean_std([cl[s] for cl, _ in curves])} | {mean_std([tr[s] for _, tr in curves])} | "
                   f"{mean_std(d, signed=True)} | {sum(x > 0 for x in d)} / {sum(x == 0 for x in d)} / "
                   f"{sum(x < 0 for x in d)} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="+", type=Path, help="JSON files written by vs_trl.py --out")
    p.add_argument("--pair", default="fp32", help="precision pair to summarise (fp32, bf16, custom)")
    args = p.parse_args(argv)
    records = []
    for path in args.records:
        try:
            records.append((str(path), json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            print(f"vs_trl_summary: cannot read {path}: {e}", file=sys.stderr)
            return 2
    print(summarise(records, args.pair))
    return 0


if __name__ == "__main__":
    sys.exit(main())
