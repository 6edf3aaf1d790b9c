"""`creditlab` command line. Subcommands: list, demo."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _cmd_list(args: argparse.Namespace) -> int:
    from creditlab.batch import fields_table
    from creditlab.registry import get_spec, list_estimators

    if args.fields:
        print(fields_table())
        return 0
    print("estimators:")
    for name in list_estimators():
        spec = get_spec(name)
        needs = f"  needs: {', '.join(spec.needs)}" if spec.needs else ""
        print(f"  {name:<14} {spec.summary}{needs}")
    return 0


def estimator_table(seed: int = 0) -> str:
    """Every registered estimator applied to one sample batch, as a fixed-width table."""
    from creditlab.registry import get_estimator, get_spec, list_estimators
    from creditlab.sample import random_batch

    batch = random_batch(n_groups=6, max_group=5, T=16, seed=seed)
    header = f"{'estimator':<14} {'needs':<28} {'adv mean':>9} {'adv std':>8} {'|adv|':>7} " \
             f"{'min':>7} {'max':>7} {'zero%':>6} {'ms':>7}"
    lines = [f"sample batch: B={batch.B} responses in {len(set(batch.group_ids.tolist()))} ragged groups, "
             f"T={batch.T}, {int(batch.response_mask.sum())} valid tokens", header, "-" * len(header)]
    for name in list_estimators():
        fn = get_estimator(name)
        t0 = time.perf_counter()
        credit = fn(batch)
        ms = (time.perf_counter() - t0) * 1e3
        m = credit.metrics
        lines.append(f"{name:<14} {','.join(get_spec(name).needs) or '-':<28} {m['credit/adv_mean']:>9.4f} "
                     f"{m['credit/adv_std']:>8.4f} {m['credit/adv_abs_mean']:>7.4f} {m['credit/adv_min']:>7.3f} "
                     f"{m['credit/adv_max']:>7.3f} {100 * m['credit/zero_frac']:>6.1f} {ms:>7.2f}")
    return "\n".join(lines)


def _cmd_demo(args: argparse.Namespace) -> int:
    print(estimator_table(seed=args.seed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="creditlab", description="fine-grained credit assignment for LLM RL")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered estimators")
    p.add_argument("--fields", action="store_true", help="list the RolloutBatch fields instead")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("demo", help="run every estimator on a sample batch and print a table")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
