"""Supervised warm-start (`creditlab sft`): imitate a task's demonstrations so RL starts from a policy that is
right sometimes. Cross-entropy on response tokens only (token-mean), AdamW, seeded.

Environment tasks with a demonstrator (`EnvTask.has_expert`, e.g. `search`) imitate whole episodes: the rows are
laid out as the multi-turn rollout lays out sampled episodes (`rollout.multiturn.demonstration_rows`), the loss is
on action tokens only (observations are attended, not imitated), and the final accuracy is the greedy episodes'
success rate with ``max_turns`` turns."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from creditlab.policy import Policy, load_policy
from creditlab.rollout.hf import sequence_logprobs
from creditlab.rollout.multiturn import MultiTurn, demonstration_rows
from creditlab.tasks import get_task
from creditlab.train.checks import one_line
from creditlab.train.config import SFTConfig
from creditlab.train.loop import evaluate
from creditlab.train.losses import aggregate


def encode_pairs(policy: Policy, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, ...]:
    """Left-padded prompt ids/mask and right-padded response ids/mask (EOS appended) for teacher forcing."""
    tok = policy.tokenizer
    prompt_ids, prompt_mask = policy.encode_prompts(prompts)  # exactly as the rollout engine encodes prompts
    r_ids = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in responses]
    T = max(map(len, r_ids))
    pad = tok.pad_token_id
    response_ids = torch.tensor([x + [pad] * (T - len(x)) for x in r_ids])
    response_mask = torch.tensor([[True] * len(x) + [False] * (T - len(x)) for x in r_ids])
    return prompt_ids, prompt_mask, response_ids, response_mask


def sft(cfg: SFTConfig) -> dict[str, Any]:
    """Warm-start `cfg.policy` on `cfg.task` demonstrations and save it to `cfg.out_dir` (load with --policy DIR).

    The options are validated before any work; `cfg.out_dir` must be new, empty, or an earlier warm-start's output
    (it holds `sft_summary.json`): sft never writes over a directory it did not create."""
    cfg.validate()
    out = Path(cfg.out_dir)
    if out.is_dir() and any(out.iterdir()) and not (out / "sft_summary.json").is_file():
        raise FileExistsError(f"--out-dir {out} is not empty and is not an earlier warm-start (no sft_summary.json); "
                              "pick a new or empty directory")
    torch.manual_seed(cfg.seed)
    try:
        task = get_task(cfg.task, **cfg.task_kwargs_dict())
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"--task {cfg.task} --task-kwargs {cfg.task_kwargs}: {one_line(e)}") from None
    try:
        policy = load_policy(cfg.policy, seed=cfg.seed)
    except ValueError as e:
        raise ValueError(f"--policy: {one_line(e)}") from None
    pool = task.problems("train", max(cfg.steps * cfg.batch_size // 4, 512), cfg.seed)
    held_out = task.problems("test", cfg.eval_problems, cfg.seed)
    optim = torch.optim.AdamW(policy.model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / cfg.steps))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    losses = []
    episodes = bool(getattr(task, "has_expert", False))  # an environment with a demonstrator: imitate episodes
    for _ in range(cfg.steps):
        policy.model.train()
        probs = [pool[i] for i in torch.randint(len(pool), (cfg.batch_size,), generator=gen).tolist()]
        prompts = [policy.format_prompt(p.prompt) for p in probs]
        if episodes:
            tensors = (*policy.encode_prompts(prompts),
                       *demonstration_rows(policy, [task.expert_turns(p, cfg.max_turns) for p in probs]))
        else:
            tensors = encode_pairs(policy, prompts, [task.demonstration(p) for p in probs])
        logp, _ = sequence_logprobs(policy.model, *tensors)
        loss = -aggregate(logp, tensors[3], "token-mean")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.model.parameters(), 1.0)
        optim.step()
        sched.step()
        losses.append(float(loss.detach()))
    if episodes:  # greedy episodes in the environment, as the trainer evaluates environment tasks
        accuracy = MultiTurn(max_turns=cfg.max_turns).evaluate(policy, task, held_out, cfg)
    else:
        accuracy = evaluate(policy, task, held_out, max_new_tokens=cfg.max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    policy.model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    summary = {"out_dir": str(out), "final_loss": losses[-1] if losses else None, "accuracy": accuracy,
               "seconds": time.perf_counter() - t0, "steps": cfg.steps}
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
