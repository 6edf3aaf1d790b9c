"""Peak memory of one SmolLM2 training step at the vs_trl setting: today's full-logits update vs the chunked LM head.

    python benchmarks/memory.py --threads 2 --out runs/memory.json          # ~3-6 min on 2 idle cores
    python benchmarks/memory.py --policy tiny --prompts 2 --group 2 --max-new-tokens 8    # smoke test (seconds)

One batch of the vs_trl setting (8 one-digit `chain_sum` prompts × 4 samples × 40 new tokens, SmolLM2-135M-Instruct
with its chat template) is sampled once; then, in one process, each variant runs one untimed warm-up update (so
AdamW's state exists, as in every step after the first) and one measured update: `sequence_logprobs` forward +
backward + AdamW step, shared prompts, in
  full      the [B, T, V]-logits path (`full_logits=True`: creditlab before the chunked head),
  chunked   the chunked LM head (`rollout.head`, the default),
  micro     the chunked head in micro-batches of --micro-rows rows, gradients accumulated (`--micro-batch-rows`),
each in fp32 and, with `--bf16`, under bf16 autocast. The sampler's peak (one `generate` of the batch) is measured
too: a training step's peak is the larger of its rollout's and its update's. Peaks are resident set size
(`creditlab.bench.memory.PeakMemory`): `peak` includes weights, gradients and AdamW state; `delta` is the peak
minus the RSS before the update. TRL's per-step peak at the same setting comes from `benchmarks/vs_trl.py`, which
measures both frameworks' steps the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from creditlab.bench.memory import timed_peak
from creditlab.device import describe, device_info, resolve_device
from creditlab.policy import load_policy
from creditlab.rollout.hf import SamplingConfig, generate, sequence_logprobs
from creditlab.tasks import get_task
from creditlab.train.losses import micro_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--policy", default="smollm2")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="also measure both update paths under bf16 autocast")
    p.add_argument("--micro-rows", type=int, default=8, help="also measure the chunked update in micro-batches of "
                                                              "this many rows (--micro-batch-rows; 0: skip)")
    p.add_argument("--out", type=Path, default=None, help="write the numbers here (JSON) and a .md table")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    policy = load_policy(args.policy, device=device)
    problems = get_task("chain_sum", digits=1, terms=2).problems("train", args.prompts, 0)
    prompts = [policy.format_prompt(q.prompt) for q in problems]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens)
    batch, sample_s, sample_mem = timed_peak(lambda: generate(policy, prompts, args.group, cfg, seed=0), device)
    tensors = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    optim = torch.optim.AdamW(policy.model.parameters(), lr=0.0)  # lr 0: every variant sees the same weights
    rows = [{"variant": "rollout: generate (fp32)", "seconds": sample_s, **sample_mem}]
    print(f"batch {batch.B} x {batch.T} response tokens (prompt width {batch.prompt_ids.shape[1]}); "
          f"{describe(device)}", flush=True)
    for bf16 in (False, True) if args.bf16 else (False,):
        for full in (True, False):
            def update(full: bool = full, bf16: bool = bf16) -> None:
                optim.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logp, _ = sequence_logprobs(policy.model, *tensors, full_logits=full)
                (-(logp * batch.response_mask).sum() / batch.response_mask.sum()).backward()
                optim.step()
                optim.zero_grad(set_to_none=True)

            update()  # warm-up: AdamW state exists from here on, as in every later training step
            _, seconds, mem = timed_peak(update, device)
            name = f"update: {'full logits' if full else 'chunked head'} ({'bf16 autocast' if bf16 else 'fp32'})"
            rows.append({"variant": name, "seconds": seconds, **mem})
            print(f"{name:<42} peak {mem['peak_mb']:8.0f} MiB  delta {mem['delta_mb']:8.0f} MiB  {seconds:6.1f} s",
                  flush=True)
        if args.micro_rows:  # the trainer's --micro-batch-rows: chunked head, gradients accumulated per micro-batch
            def micro_update(bf16: bool = bf16) -> None:
                optim.zero_grad(set_to_none=True)
                parts = torch.arange(batch.B).split(args.micro_rows)
                for idx, w in zip(parts, micro_weights(batch.response_mask, parts, "token-mean")):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        logp, _ = sequence_logprobs(policy.model, *(t[idx] for t in tensors))
                    mask = batch.response_mask[idx]
                    (-w * (logp * mask).sum() / mask.sum().clamp_min(1)).backward()
                optim.step()
                optim.zero_grad(set_to_none=True)

            micro_update()
            _, seconds, mem = timed_peak(micro_update, device)
            name = f"update: chunked head, micro-batches of {args.micro_rows} rows " \
                   f"({'bf16 autocast' if bf16 else 'fp32'})"
            rows.append({"variant": name, "seconds": seconds, **mem})
            print(f"{name:<42} peak {mem['peak_mb']:8.0f} MiB  delta {mem['delta_mb']:8.0f} MiB  {seconds:6.1f} s",
                  flush=True)
    table = markdown(rows)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        record = {"policy": args.policy, "prompts": args.prompts, "group": args.group,
                  "max_new_tokens": args.max_new_tokens, "B": batch.B, "T": batch.T,
                  "prompt_width": batch.prompt_ids.shape[1], "environment": device_info(device), "rows": rows,
                  "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:] if argv is None else argv)}
        args.out.write_text(json.dumps(record, indent=2))
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


def markdown(rows: list[dict]) -> str:
    lines = ["| variant | peak RSS (MiB) | peak − RSS before (MiB) | seconds |", "|---|---:|---:|---:|"]
    lines += [f"| {r['variant']} | {r['peak_mb']:.0f} | {r['delta_mb']:.0f} | {r['seconds']:.1f} |" for r in rows]
    by_name = {r["variant"]: r for r in rows}
    full, chunk = by_name.get("update: full logits (fp32)"), by_name.get("update: chunked head (fp32)")
    if full and chunk:
        lines.append("")
        lines.append(f"chunked / full (fp32): peak {chunk['peak_mb'] / full['peak_mb']:.2f}×, "
                     f"delta {chunk['delta_mb'] / max(full['delta_mb'], 1e-9):.2f}×")
    micro = [r for r in rows if "micro-batches" in r["variant"] and "fp32" in r["variant"]]
    if full and micro:
        lines.append(f"micro-batched chunked / full (fp32): peak {micro[0]['peak_mb'] / full['peak_mb']:.2f}×, "
                     f"delta {micro[0]['delta_mb'] / max(full['delta_mb'], 1e-9):.2f}×")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
