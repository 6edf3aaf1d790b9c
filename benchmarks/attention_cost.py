"""Cost of the attention-signal pass (WAAD/FAI) against a training step, on SmolLM2 at ~1k tokens.

    python benchmarks/attention_cost.py                       # B=4 rows, 1000 response tokens (~5-10 min on CPU)
    python benchmarks/attention_cost.py --rows 2 --tokens 256 --no-rollout     # quick
    python benchmarks/attention_cost.py --device cuda         # on a GPU machine

One batch: B copies of an arith_chain prompt (SmolLM2 chat template) followed by `--tokens` random response tokens
(the cost of attention does not depend on the content). Each measurement runs in a fresh subprocess (so its peak
resident memory is its own), once untimed (not the rollout) and `--repeats` times timed (minimum reported):
  attn     `creditlab.signals.attention.attention_signals` with the paper's layers (five in [L/3, 2L/3])
  forward  one no-grad forward over prompt + response (`sequence_logprobs`), for scale
  update   `sequence_logprobs` forward + backward + AdamW step (the policy update of one PPO minibatch)
  rollout  sampling `--tokens` tokens for the B rows (KV-cached, stop tokens ignored), unless --no-rollout
Reported: seconds, peak memory above the loaded model (CPU: ru_maxrss; CUDA: max_memory_allocated), the attention
pass's share of a step (rollout + attn + update), and the size a full [L,H,N,N] attention stack would take.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

KINDS = ("attn", "forward", "update", "rollout")


def _batch(policy, rows: int, tokens: int, device: str):
    from creditlab.tasks import get_task

    problem = get_task("arith_chain", n_steps=3).problems("train", 1, 0)[0]
    p_ids, p_mask = policy.encode_prompts([policy.format_prompt(problem.prompt)] * rows)
    g = torch.Generator().manual_seed(0)
    r_ids = torch.randint(100, policy.tokenizer.vocab_size - 100, (rows, tokens), generator=g)
    r_mask = torch.ones(rows, tokens, dtype=torch.bool)
    return [t.to(device) for t in (p_ids, p_mask, r_ids, r_mask)]


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(kind: str, rows: int, tokens: int, repeats: int, device: str, threads: int, bf16: bool
           ) -> dict[str, float]:
    from creditlab.policy import load_policy
    from creditlab.rollout.hf import SamplingConfig, sample_tokens, sequence_logprobs
    from creditlab.signals.attention import AttnSignalConfig, attention_signals

    if threads:
        torch.set_num_threads(threads)
    policy = load_policy("smollm2")
    policy.model.to(device)
    p_ids, p_mask, r_ids, r_mask = _batch(policy, rows, tokens, device)
    optim = torch.optim.AdamW(policy.model.parameters(), lr=1e-6)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_mb(device) if device.startswith("cuda") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    autocast = lambda: torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16)  # noqa: E731

    def run() -> None:
        if kind == "attn":
            attention_signals(policy.model, p_ids, p_mask, r_ids, r_mask, AttnSignalConfig(rows_per_pass=rows,
                                                                                            bf16=bf16))
        elif kind == "forward":
            with torch.no_grad(), autocast():
                sequence_logprobs(policy.model, p_ids, p_mask, r_ids, r_mask)
        elif kind == "update":
            policy.model.train()
            with autocast():
                logp, _ = sequence_logprobs(policy.model, p_ids, p_mask, r_ids, r_mask)
            optim.zero_grad(set_to_none=True)
            (-(logp.sum() / r_mask.sum())).backward()
            optim.step()
        else:
            cfg = SamplingConfig(temperature=1.0, max_new_tokens=tokens, bf16=bf16)
            sample_tokens(policy.model, p_ids[:1], p_mask[:1], cfg, generator=torch.Generator(device).manual_seed(0),
                          stop_ids=[-1], pad_id=policy.tokenizer.pad_token_id,
                          expand=torch.zeros(rows, dtype=torch.long, device=device))
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    times = []
    warmup = 0 if kind == "rollout" else 1  # a 1000-step rollout warms itself up in its first steps
    for i in range(repeats + warmup):
        t0 = time.perf_counter()
        run()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    cfg = policy.model.config
    return {"seconds": min(times), "peak_mb_above_model": _peak_mb(device) - base,
            "layers": cfg.num_hidden_layers, "heads": cfg.num_attention_heads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--tokens", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="every part under bf16 autocast (the trainer's --bf16 "
                   "--update-bf16; the attention pass follows --bf16)")
    p.add_argument("--no-rollout", action="store_true", help="skip timing the sampling of the response")
    p.add_argument("--only", default="", help="comma-separated subset of attn,forward,update,rollout")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.rows, args.tokens, args.repeats, args.device, args.threads,
                                args.bf16)))
        return
    res = {}
    only = set(args.only.split(",")) if args.only else set(KINDS)
    for kind in KINDS:
        if (kind == "rollout" and args.no_rollout) or kind not in only:
            continue
        cmd = [sys.executable, __file__, "--worker", kind, "--rows", str(args.rows), "--tokens", str(args.tokens),
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--device", args.device,
               *(["--bf16"] if args.bf16 else [])]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        res[kind] = json.loads(out)
        print(f"{kind:<8} {res[kind]['seconds']:8.2f} s   peak +{res[kind]['peak_mb_above_model']:8.0f} MB", flush=True)
    if not {"attn", "update", "forward"} <= set(res):
        print(json.dumps(res, indent=2))
        return
    L, H = res["attn"]["layers"], res["attn"]["heads"]
    N = args.tokens + 70  # ~ prompt length of the chat-formatted arith_chain prompt
    full_gb = args.rows * L * H * N * N * 4 / 2**30
    step = res["attn"]["seconds"] + res["update"]["seconds"] + res.get("rollout", {}).get("seconds", 0.0)
    summary = {
        "rows": args.rows, "tokens": args.tokens, "device": args.device, "threads": torch.get_num_threads(),
        "bf16": args.bf16,
        "attn_share_of_step": res["attn"]["seconds"] / step,
        "attn_over_update": res["attn"]["seconds"] / res["update"]["seconds"],
        "attn_over_forward": res["attn"]["seconds"] / res["forward"]["seconds"],
        "full_attention_stack_gb_fp32": full_gb, "one_layer_map_gb_fp32": full_gb / L, "results": res,
        "step_includes_rollout": "rollout" in res,
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "results"}, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
