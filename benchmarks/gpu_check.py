"""One script for a GPU machine: a SmolLM2 training step and every registered estimator at 512×4096, timed.

    python benchmarks/gpu_check.py --out runs/gpu_check.json                 # on the GPU (cuda when present)
    python benchmarks/gpu_check.py --device cpu --policy tiny --step-sizes 4x16 --estimator-sizes 16x64 \\
        --max-new-tokens 8 --out runs/gpu_check_smoke.json                   # CPU smoke test (~1 min)

What it measures, in one process, on `--device`:
  step        one RL step of SmolLM2-135M-Instruct through the trainer's own functions, at `--step-sizes`
              (default 8×4 prompts×samples, 96 new tokens): `generate` (sampling), then `sequence_logprobs` forward +
              backward + AdamW step, each in fp32 and under bf16 autocast; best of `--repeats` after one untimed
              warm-up; peak memory (CUDA allocator peak on a GPU, RSS on a CPU);
  estimators  every registered estimator on `creditlab.bench.speed.realistic_batch` at `--estimator-sizes`
              (default 512×4096), moved to the device: the registry's checked call, best of several runs with a
              device synchronize around each; an estimator that fails on the device is recorded with its error
              (a CPU tensor made inside the estimator, say) instead of stopping the others.
The JSON names the device (GPU model, CPU model and flags), torch/transformers versions and the git commit; the
Markdown next to it (`.md`) is the table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from creditlab.bench.memory import PeakMemory
from creditlab.bench.speed import parse_sizes, realistic_batch
from creditlab.device import describe, device_info, resolve_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall time of `fn` over `repeats` timed calls after one untimed warm-up, synchronized."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def time_training_step(policy_name: str, prompts: int, group: int, max_new_tokens: int, device: torch.device,
                       repeats: int) -> list[dict[str, Any]]:
    """Sampling and update of one SmolLM2 batch, fp32 and bf16 autocast: seconds and peak memory per phase."""
    from creditlab.policy import load_policy
    from creditlab.rollout.hf import SamplingConfig, generate, sequence_logprobs
    from creditlab.tasks import get_task

    policy = load_policy(policy_name, device=device)
    problems = get_task("chain_sum", digits=2, terms=2).problems("train", prompts, 0)
    texts = [policy.format_prompt(q.prompt) for q in problems]
    optim = torch.optim.AdamW(policy.model.parameters(), lr=0.0)  # lr 0: repeats see the same weights
    rows = []
    for bf16 in (False, True):
        cfg = SamplingConfig(temperature=1.0, max_new_tokens=max_new_tokens, bf16=bf16)
        batch = generate(policy, texts, group, cfg, seed=0)
        tensors = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)

        def update(bf16: bool = bf16, tensors: tuple = tensors) -> None:
            optim.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logp, _ = sequence_logprobs(policy.model, *tensors)
            mask = tensors[3]
            (-(logp * mask).sum() / mask.sum()).backward()
            optim.step()

        precision = "bf16 autocast" if bf16 else "fp32"
        for phase, fn in (("sample", lambda cfg=cfg: generate(policy, texts, group, cfg, seed=0)),
                          ("update", update)):
            seconds = best(fn, device, repeats)
            with PeakMemory(device) as mem:
                fn()
            rows.append({"phase": phase, "precision": precision, "prompts": prompts, "group": group,
                         "tokens": int(batch.response_mask.sum()), "T": batch.T, "seconds": seconds,
                         **mem.record()})
            print(f"step {phase:<6} {precision:<13} {seconds:8.3f} s", flush=True)
    return rows


def time_estimators(B: int, T: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Every registered estimator's checked call on a realistic B×T batch on `device`."""
    from creditlab.registry import get_spec, list_estimators

    batch = realistic_batch(B, T, seed=0).to(device)
    rows = []
    for name in list_estimators():
        spec = get_spec(name)
        try:
            seconds = best(lambda spec=spec: spec.fn(batch), device, repeats)
            row = {"estimator": name, "B": B, "T": T, "seconds": seconds, "error": ""}
        except Exception as e:  # one estimator failing on this device must not hide the others
            row = {"estimator": name, "B": B, "T": T, "seconds": math.nan, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        shown = f"{row['seconds'] * 1e3:9.2f} ms" if not row["error"] else "error: " + row["error"][:80]
        print(f"estimator {name:<16} {B}x{T}  {shown}", flush=True)
    return rows


def markdown(record: dict[str, Any]) -> str:
    lines = [f"Measured on {record['where']} (`{record['command']}`, git {record['git_commit'][:12]}).", "",
             "| phase | precision | batch | seconds | peak memory (MiB) |", "|---|---|---|---:|---:|"]
    for r in record["step"]:
        peak = r.get("cuda_peak_mb", r["peak_mb"])
        lines.append(f"| {r['phase']} | {r['precision']} | {r['prompts']}×{r['group']}, {r['tokens']} response "
                     f"tokens | {r['seconds']:.3f} | {peak:.0f} |")
    lines += ["", "| estimator | B×T | ms | note |", "|---|---|---:|---|"]
    for r in record["estimators"]:
        ms = f"{r['seconds'] * 1e3:.2f}" if not r["error"] else "—"
        lines.append(f"| {r['estimator']} | {r['B']}×{r['T']} | {ms} | {r['error'][:100]} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda[:N]")
    p.add_argument("--policy", default="smollm2")
    p.add_argument("--step-sizes", default="8x4", help="prompts x samples of the training step")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--estimator-sizes", default="512x4096", help="comma-separated BxT of the estimator timings")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-step", action="store_true", help="only the estimators")
    p.add_argument("--out", type=Path, default=Path("runs/gpu_check.json"))
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    print(f"gpu_check on {describe(device)}", flush=True)
    (prompts, group), = parse_sizes(args.step_sizes)
    step = [] if args.skip_step else time_training_step(args.policy, prompts, group, args.max_new_tokens, device,
                                                         args.repeats)
    estimators = [row for B, T in parse_sizes(args.estimator_sizes)
                  for row in time_estimators(B, T, device, args.repeats)]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    record = {"where": describe(device), "environment": device_info(device), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "git_commit": commit,
              "command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "policy": args.policy, "step": step, "estimators": estimators}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2, default=str))
    args.out.with_suffix(".md").write_text(markdown(record) + "\n")
    print(markdown(record))
    failed = [r["estimator"] for r in estimators if r["error"]]
    if failed:
        print(f"estimators that failed on {device}: {sorted(set(failed))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
