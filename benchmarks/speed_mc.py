"""Cost of Monte-Carlo credit: shared-prefix continuations vs naive re-prefill, and samples per training step.

    python benchmarks/speed_mc.py continuation [--policy tiny] [--prefixes 16] [--prefix-len 192] [--cont-len 32]
                                               [--samples 8] [--repeats 3] [--threads 1] [--device cpu]
    python benchmarks/speed_mc.py train [--policy tiny] [--steps 2] [--threads 1] [--mc-samples 9] [--task-kwargs JSON]

`continuation`: K continuations of each of N prefixes (prompt + partial response, `--prefix-len` tokens), two ways in
one process on the same prefixes with the same seeds:
  shared  `creditlab.rollout.hf.continue_from(prefixes, n=K)`: each prefix is prefilled once and its KV cache
          indexed out to its K rows (what `creditlab.signals.mc` does);
  naive   `continue_from(every prefix repeated K times, n=1)`: every continuation row prefills its own copy.
Both decode the same N*K rows for `--cont-len` tokens (EOS disabled, so both generate exactly N*K*cont-len tokens);
the table gives continuation tokens per second (median of --repeats) and their ratio.

`train`: one short `creditlab train` run per estimator on arith_chain (grpo, spo_chain, vineppo with independent
samples; spo_tree and treepo on segment trees) and the work per step from metrics.jsonl: the policy's own samples,
the Monte-Carlo continuations (`samples/extra`), their tokens, and the step time. Use a warm-started `--policy`: an
untrained one puts nearly every token below SPO's probability threshold and writes no reasoning steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def continuation_bench(args: argparse.Namespace) -> dict:
    from creditlab.policy import load_policy
    from creditlab.rollout.hf import SamplingConfig, continue_from

    policy = load_policy(args.policy, seed=0)
    policy.model.to(args.device)
    if policy.model.generation_config is not None:
        policy.model.generation_config.eos_token_id = None
    eos = policy.tokenizer.eos_token_id
    with torch.no_grad():  # EOS never sampled: both ways generate exactly N*K*cont_len tokens
        head = policy.model.get_output_embeddings()
        if getattr(head, "bias", None) is None:
            head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0], device=head.weight.device))
        head.bias[eos] = -1e9
    g = torch.Generator().manual_seed(0)
    vocab = [i for i in range(policy.model.config.vocab_size) if i not in policy.tokenizer.all_special_ids]
    pick = torch.tensor(vocab)
    prefixes = [pick[torch.randint(len(vocab), (args.prefix_len,), generator=g)].tolist()
                for _ in range(args.prefixes)]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=args.cont_len)

    def shared() -> int:
        out = continue_from(policy, prefixes, args.samples, cfg, seed=1)
        return sum(len(c) for rows in out for c in rows)

    def naive() -> int:
        out = continue_from(policy, [p for p in prefixes for _ in range(args.samples)], 1, cfg, seed=1)
        return sum(len(c) for rows in out for c in rows)

    result = {}
    for name, fn in (("shared", shared), ("naive", naive)):
        fn()  # warm-up
        times, tokens = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tokens = fn()
            times.append(time.perf_counter() - t0)
        result[name] = {"seconds": statistics.median(times), "tokens": tokens,
                        "tokens_per_s": tokens / statistics.median(times)}
    result["ratio"] = result["shared"]["tokens_per_s"] / result["naive"]["tokens_per_s"]
    result["setup"] = {k: getattr(args, k) for k in ("policy", "prefixes", "prefix_len", "cont_len", "samples",
                                                     "repeats", "threads", "device")}
    print(f"{args.prefixes} prefixes x {args.prefix_len} tokens, K={args.samples} continuations x {args.cont_len} "
          f"tokens, policy {args.policy}, {args.threads} thread(s), {args.device}")
    print(f"{'way':<8} {'tokens':>8} {'seconds':>9} {'tokens/s':>10}")
    for name in ("shared", "naive"):
        r = result[name]
        print(f"{name:<8} {r['tokens']:>8} {r['seconds']:>9.3f} {r['tokens_per_s']:>10.0f}")
    print(f"shared / naive tokens/s: {result['ratio']:.2f}x")
    return result


RUNS = [("grpo", []), ("spo_chain", []), ("vineppo", []),
        ("spo_tree", ["--rollout", "tree", "--tree-fanout", "4,2", "--tree-segment-len", "8"]),
        ("treepo", ["--rollout", "tree", "--tree-fanout", "4,2", "--tree-segment-len", "8",
                    "--estimator-kwargs", '{"segment_len": 8}'])]


def train_bench(args: argparse.Namespace) -> dict:
    from creditlab.cli import main as cli

    base = ["--task", "arith_chain", "--task-kwargs", args.task_kwargs, "--policy", args.policy, "--steps",
            str(args.steps), "--prompts-per-step", "8", "--group-size", "8", "--max-new-tokens", "32",
            "--eval-problems", "4", "--eval-every", "1000", "--no-tensorboard", "--no-progress", "--sample-every", "0",
            "--mc-samples", str(args.mc_samples)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in RUNS:
            run = Path(tmp) / name
            assert cli(["train", *base, *extra, "--estimator", name, "--out-dir", str(run)]) == 0
            rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][1:]
            extra_s = [r.get("samples/extra", 0.0) for r in rows]
            policy_s = [r["samples"] - p - e for r, p, e in zip(rows, [0] + [r["samples"] for r in rows], extra_s)]
            out[name] = {"policy_samples": statistics.mean(policy_s), "extra_samples": statistics.mean(extra_s),
                         "extra_tokens": statistics.mean(r.get("tokens/extra", 0.0) for r in rows),
                         "time_mc": statistics.mean(r.get("time/mc", 0.0) for r in rows),
                         "time_step": statistics.mean(r["time/step"] for r in rows)}
    g = out["grpo"]["policy_samples"] + out["grpo"]["extra_samples"]
    print(f"samples per step (8 prompts, --mc-samples {args.mc_samples}, {args.steps} steps, policy {args.policy})")
    print(f"{'estimator':<10} {'policy':>7} {'MC extra':>9} {'x grpo':>7} {'MC tokens':>10} {'time/mc':>8} "
          f"{'time/step':>9}")
    for name, r in out.items():
        total = r["policy_samples"] + r["extra_samples"]
        print(f"{name:<10} {r['policy_samples']:>7.0f} {r['extra_samples']:>9.0f} {total / g:>7.1f} "
              f"{r['extra_tokens']:>10.0f} {r['time_mc']:>8.2f} {r['time_step']:>9.2f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["continuation", "train"])
    p.add_argument("--policy", default="tiny")
    p.add_argument("--prefixes", type=int, default=16)
    p.add_argument("--prefix-len", type=int, default=192)
    p.add_argument("--cont-len", type=int, default=32)
    p.add_argument("--samples", type=int, default=8, help="K continuations per prefix")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2, help="train: RL steps per estimator")
    p.add_argument("--mc-samples", type=int, default=9, help="train: --mc-samples")
    p.add_argument("--task-kwargs", default='{"n_steps": 2}', help="train: arith_chain options (JSON)")
    p.add_argument("--out", default="", help="write the result as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = continuation_bench(args) if args.part == "continuation" else train_bench(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
