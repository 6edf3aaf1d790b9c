"""`creditlab` command line. Subcommands: list, train, sft, demo, speed, inspect, bench, credit-quality."""

from __future__ import annotations

import argparse
import sys
import time
import typing
from collections.abc import Sequence


def _cmd_list(args: argparse.Namespace) -> int:
    from creditlab.batch import fields_table
    from creditlab.policy import list_policies
    from creditlab.registry import get_spec, list_estimators
    from creditlab.tasks import list_tasks

    if args.fields:
        print(fields_table())
        return 0
    from creditlab.envs import list_envs

    print("tasks:\n  " + "\n  ".join(list_tasks()))
    print("environments (multi-turn tasks of the same name):\n  " + "\n  ".join(list_envs()))
    print("policies:\n  " + "\n  ".join(list_policies()) + "\n  <any local Hugging Face model directory>")
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


def _cmd_train(args: argparse.Namespace) -> int:
    import json

    from creditlab.train.config import train_config_from_args
    from creditlab.train.loop import train

    summary = train(train_config_from_args(args))
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    import json

    from creditlab.train.config import SFTConfig, dataclass_from_args
    from creditlab.train.sft import sft

    print(json.dumps(sft(dataclass_from_args(SFTConfig, args)), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from creditlab.demo import check_demo_args, run_demo

    if not args.table_only:
        check_demo_args(args.out_root, args.other_estimator)  # before any work, the table included
    print(estimator_table(seed=args.seed), flush=True)
    if args.table_only:
        return 0
    run_demo(out_root=args.out_root, seed=args.seed, other=args.other_estimator)
    return 0


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one line (`creditlab train: error: argument --steps: invalid int value: 'x'`),
    no usage block, exit code 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="creditlab", description="fine-grained credit assignment for LLM RL")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", help="list registered estimators")
    p.add_argument("--fields", action="store_true", help="list the RolloutBatch fields instead")
    p.set_defaults(func=_cmd_list)
    from creditlab.train.config import SFTConfig, add_dataclass_args, add_train_args

    p = sub.add_parser("train", help="RL-train a policy on a task with any registered estimator")
    add_train_args(p)
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("sft", help="supervised warm-start on task demonstrations")
    add_dataclass_args(p, SFTConfig)
    p.set_defaults(func=_cmd_sft)
    p = sub.add_parser("demo", help="estimator table on a sample batch, then warm-start tiny and train it twice")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-only", action="store_true", help="only print the estimator table")
    p.add_argument("--out-root", default="runs/demo", help="where the demo's run directories go")
    p.add_argument("--other-estimator", default="tempo", help="estimator trained next to grpo")
    p.set_defaults(func=_cmd_demo)
    from creditlab.bench.speed import add_speed_args, run_speed
    from creditlab.viz.inspect import add_inspect_args, run_inspect

    p = sub.add_parser("speed", help="time every estimator against its loop reference and a training step")
    add_speed_args(p)
    p.set_defaults(func=run_speed)
    p = sub.add_parser("inspect", help="HTML page of a run's sampled responses coloured by per-token advantage")
    add_inspect_args(p)
    p.set_defaults(func=run_inspect)
    from creditlab.bench.learning import add_bench_args, run_bench_cli
    from creditlab.bench.quality import add_quality_args, run_quality_cli

    p = sub.add_parser("bench", help="estimators x tasks x seeds through the trainer: report.md, curves.png")
    add_bench_args(p)
    p.set_defaults(func=run_bench_cli)
    p = sub.add_parser("credit-quality", help="how well each estimator's advantages locate the first wrong step")
    add_quality_args(p)
    p.set_defaults(func=run_quality_cli)
    return parser


# What bad input raises (options, files, directories): reported as one line, exit code 2, no traceback. Anything
# else is a bug and keeps its traceback.
USER_ERRORS = (KeyError, ValueError, OSError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # bad syntax: one line and SystemExit(2) from OneLineParser.error
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        from creditlab.train.checks import one_line

        print(f"creditlab {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
