"""Summarise several `benchmarks/vs_trl.py` records (one per seed): speed ratios and paired accuracy.

    .venv/bin/python benchmarks/vs_trl_summary.py benchmarks/results/vs_trl_fp32_avx2_seed*.json
    .venv/bin/python benchmarks/vs_trl_summary.py --pair bf16 benchmarks/results/vs_trl_bf16_seed*.json

    .venv/bin/python benchmarks/vs_trl_summary.py --pair all benchmarks/results/vs_trl_*seed*.json \
        benchmarks/results/vs_trl_equal_precision.json

For one precision pair (`--pair`, default fp32; `all`: every pair of every record, each a row) prints a markdown
table with one row per record (seed, samples/s of both sides, their ratio, peak memory ratio, held-out accuracy of
both at every evaluated step) and, over the records, the mean ± sample std of the ratio and of the paired accuracy
difference creditlab − TRL at each step that every record evaluated. Last, the paired difference at each record's
*last* evaluation (records of different lengths pool here): mean ± std, standard error, 95 % Student-t interval of
the mean, ahead / level / behind and the exact two-sided sign-test p (`creditlab.bench.stats`). Reads JSON only;
runs in any of the project's environments (needs creditlab and numpy, not TRL).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from creditlab.bench.stats import Paired


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


def entries(records: list[tuple[str, dict[str, Any]]], pair: str) -> list[tuple[str, dict[str, Any]]]:
    """(row label, the pair's numbers) for every record: its `pair`, or with "all" each pair it has."""
    out = []
    for name, rep in records:
        pairs = rep.get("pairs", {})
        if pair == "all":
            out += [(f"{rep['meta']['seed']} ({p})", r) for p, r in pairs.items()]
        elif pair in pairs:
            out.append((str(rep["meta"]["seed"]), pairs[pair]))
        else:
            raise SystemExit(f"{name}: no '{pair}' pair in this record (has: {', '.join(pairs)})")
    if not out:
        raise SystemExit("no precision pair in these records")
    return out


def summarise(records: list[tuple[str, dict[str, Any]]], pair: str) -> str:
    rows, ratios, curves, last = [], [], [], []
    for label, r in entries(records, pair):
        cl, tr = curve(r["creditlab"]), curve(r["trl"])
        ratios.append(float(r["ratio_samples_per_s"]))
        curves.append((cl, tr))
        steps = sorted(set(cl) & set(tr))
        last.append(cl[steps[-1]] - tr[steps[-1]])
        acc = ", ".join(f"{s}: {cl[s]:.3f} vs {tr[s]:.3f}" for s in steps)
        rows.append(f"| {label} | {r['creditlab']['samples_per_s']:.2f} | "
                    f"{r['trl']['samples_per_s']:.2f} | {r['ratio_samples_per_s']:.2f}× | {r['peak_mb_ratio']:.2f}× | "
                    f"{acc} |")
    common = sorted(set.intersection(*(set(cl) & set(tr) for cl, tr in curves)))
    diffs = {s: [cl[s] - tr[s] for cl, tr in curves] for s in common}
    out = ["| seed | creditlab samples/s | TRL samples/s | ratio | peak memory ratio | held-out accuracy by step, "
           "creditlab vs TRL |", "|---:|---:|---:|---:|---:|---|", *rows, "",
           f"samples/s ratio over {len(ratios)} {'rows' if pair == 'all' else 'records'}: {mean_std(ratios)} "
           f"(min {min(ratios):.2f}×, "
           f"max {max(ratios):.2f}×)", ""]
    out += ["| step | creditlab mean ± std | TRL mean ± std | creditlab − TRL (paired) | creditlab ahead / level / "
            "behind |", "|---:|---:|---:|---:|---|"]
    for s in common:
        d = diffs[s]
        out.append(f"| {s} | {mean_std([cl[s] for cl, _ in curves])} | {mean_std([tr[s] for _, tr in curves])} | "
                   f"{mean_std(d, signed=True)} | {sum(x > 0 for x in d)} / {sum(x == 0 for x in d)} / "
                   f"{sum(x < 0 for x in d)} |")
    out += ["", last_line(Paired(tuple(range(len(last))), tuple(last)))]
    return "\n".join(out)


def last_line(d: Paired) -> str:
    """The paired difference at each record's last evaluation, pooled."""
    text = f"creditlab − TRL at each record's last evaluation, {d.n} pairs: {mean_std(list(d.diffs), signed=True)}"
    if d.n > 1:
        lo, hi = d.ci95
        text += f" (standard error {d.se:.3f}; 95 % t-interval of the mean [{lo:+.3f}, {hi:+.3f}])"
    return text + f"; ahead / level / behind {' / '.join(map(str, d.wins))}; sign test p = {d.sign_p:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("records", nargs="+", type=Path, help="JSON files written by vs_trl.py --out")
    p.add_argument("--pair", default="fp32", help="precision pair to summarise (fp32, bf16, custom; all: every pair)")
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
