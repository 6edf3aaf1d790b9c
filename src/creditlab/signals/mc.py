"""Monte-Carlo values of partial responses: K continuations of prompt + response[:c], scored by the task.

    cuts, fill = spo_chain_cuts(batch, ctx, threshold=0.9, interval=5)     # [B,C] prefix lengths, -1 padding
    est = continuation_values(batch, cuts, ctx, samples=9, sampling=SamplingConfig(temperature=1.0, max_new_tokens=64))
    batch = batch.replace(mc_cuts=est.cuts, mc_values=est.values)          # what spo_chain / vineppo read

A *cut* c is a response prefix length: the state prompt + response[:c] (c = 0 is the prompt alone). Its value is the
mean task reward of K continuations sampled from the policy at the rollout's sampling settings; a continuation that
hits the length limit (the response budget `max_new_tokens` minus c) without a stop token scores
`unfinished_penalty` (VinePPO / SPO: `unfinished_response_penalty`, 0 in their configs; None scores the truncated
text like any response).

Cost. Identical prefixes are sampled once (the prompt state of a group, say; VinePPO deduplicates the same way) and
each distinct prefix is prefilled once: `creditlab.rollout.hf.continue_from` indexes its KV cache out to the K
continuation rows (no K-fold prefill). Every continuation is charged to the run through ``ctx.count``:
``samples/extra`` (continuations), ``tokens/extra`` (continuation tokens kept, each within its budget),
``mc/prefixes`` and ``mc/prefix_tokens`` (distinct prefixes and their prefill length, prompt included).

Where the cuts go is each method's rule (`CUT_RULES`, keyed by estimator name; their keyword arguments are the
estimator's own hyper-parameters, so ``--estimator-kwargs '{"interval": 1}'`` moves both):
`spo_chain_cuts` (before low-probability tokens) and `step_start_cuts` (VinePPO: at reasoning-step starts).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch


@dataclass
class MCValues:
    """Monte-Carlo estimates at the cuts of a batch (C cut columns, -1 / 0 padding)."""

    cuts: Tensor  # [B,C] long prefix length of each state, -1 on padding
    values: Tensor  # [B,C] float mean continuation reward (the row's reward for `fill` cuts), 0 on padding
    counts: Tensor  # [B,C] long continuations behind each value (0 on padding and on filled cuts)
    stderr: Tensor  # [B,C] float standard error of the mean, std (ddof 1) / sqrt(K); 0 where K < 2


def pad_cuts(rows: list[list[int]], device: torch.device | str = "cpu") -> Tensor:
    """Ragged increasing cut lists -> [B,C] long with -1 padding (C >= 1)."""
    C = max([len(r) for r in rows] + [1])
    out = torch.full((len(rows), C), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            out[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out.to(device)


def _compact(chosen: Tensor) -> Tensor:
    """[B,T] bool -> [B,C] long: the chosen columns of each row in order, -1 padding (C >= 1)."""
    B, T = chosen.shape
    pos = torch.arange(T, device=chosen.device).expand(B, T)
    key = torch.where(chosen, pos, pos + T).sort(dim=1).values  # chosen columns first, in order
    C = max(int(chosen.sum(dim=1).max()) if B and T else 0, 1)
    key = key[:, :C] if T else torch.full((B, C), T, dtype=torch.long, device=chosen.device)
    return torch.where(key < T, key, torch.full_like(key, -1))


# ------------------------------------------------------------------------------------------------ cut rules
def spo_chain_cuts(batch: RolloutBatch, ctx: Any = None, *, threshold: float = 0.9, interval: int = 5,
                   prompt_value: str = "mc") -> tuple[Tensor, Tensor]:
    """SPO-chain's cut points (AIFrameResearch/SPO `_create_value_estimation_requests`): the tokens with
    p_t < threshold, every `interval`-th of them in order, each cut *before* its token (prefix length t; t = 0 is the
    prompt state). `prompt_value="mc"` adds the prompt state to every non-empty row (the corrected first segment);
    "zero" is the code (the prompt only when token 0 is a low-probability token); "group_mean" never samples the
    prompt (the estimator uses the group's mean reward). Returns (cuts [B,C], fill [B,C] all False)."""
    if batch.logprobs is None:
        raise ValueError("spo_chain cut points need RolloutBatch.logprobs (the rollout engine's return_logprobs)")
    mask = batch.response_mask
    low = mask & (batch.logprobs.double().exp() < threshold)  # [B,T]
    rank = low.long().cumsum(dim=1) - 1
    chosen = low & (rank % interval == 0)
    if prompt_value == "mc" and chosen.shape[1]:
        chosen[:, 0] = mask.any(dim=1)
    elif prompt_value == "group_mean" and chosen.shape[1]:
        chosen[:, 0] = False
    cuts = _compact(chosen)
    return cuts, torch.zeros_like(cuts, dtype=torch.bool)


def step_start_cuts(batch: RolloutBatch, ctx: Any = None, *, steps: str = "auto", max_steps: int | None = None
                    ) -> tuple[Tensor, Tensor]:
    """VinePPO's states (McGill-NLP/VinePPO `_create_value_estimation_requests`): the prompt, then the prefix before
    each step's first token, steps 1..n-1 (the value after the last step is the reward). Steps come from
    `batch.step_ids` when set, else from `creditlab.signals.steps` (`steps`: "auto" = the task's step spans when its
    verifier gives them, else "newline"). `max_steps` (max_step_for_value_estimation): states past s_max_steps are not
    sampled; the first of them is a `fill` cut whose value is the reward (the reference fills V backwards from the
    return, so those steps get 0). Returns (cuts [B,C], fill [B,C] bool)."""
    step_ids = batch.step_ids if batch.step_ids is not None else segment_steps(batch, ctx, steps)
    mask = batch.response_mask
    T = mask.shape[1]
    # step k >= 1 starts at its first token: step ids increase along a row, so that is where the id first exceeds
    # every id before it (-1 tokens between steps never do)
    run_max = torch.cummax(step_ids, dim=1).values if T else step_ids  # [B,T]
    prev_max = torch.cat([torch.full_like(run_max[:, :1], -1), run_max[:, :-1]], dim=1)
    starts = mask & (step_ids >= 1) & (step_ids > prev_max)
    chosen = starts.clone()
    if T:
        chosen[:, 0] = mask.any(dim=1)  # s_0, the prompt state
    if max_steps is None:
        cuts = _compact(chosen)
        return cuts, torch.zeros_like(cuts, dtype=torch.bool)
    k = chosen.long().cumsum(dim=1) - 1  # the state each cut opens (0 = the prompt)
    cuts = _compact(chosen & (k <= max_steps + 1))  # s_0..s_max_steps sampled, s_{max_steps+1} filled with R
    fill = (torch.arange(cuts.shape[1], device=cuts.device)[None, :] == max_steps + 1) & (cuts >= 0)
    return cuts, fill


def segment_steps(batch: RolloutBatch, ctx: Any, steps: str = "auto") -> Tensor:
    """step_ids [B,T] of the batch under `steps` ("auto": the task's spans when the scores carry them)."""
    from creditlab.signals.steps import Segmenter

    if steps == "auto":
        scores = list(getattr(ctx, "scores", ()) or ())
        steps = "task" if scores and all(getattr(s, "step_spans", None) is not None for s in scores) else "newline"
    return Segmenter(steps).segment(batch, ctx).step_ids


CUT_RULES: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "spo_chain": spo_chain_cuts,
    "vineppo": step_start_cuts,
}


def cuts_for(name: str, batch: RolloutBatch, ctx: Any, hyperparams: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The cut rule of estimator `name` (step starts for any other estimator reading mc_values), called with the
    hyper-parameters it shares with the estimator (pass the estimator's defaults merged with the run's kwargs)."""
    rule = CUT_RULES.get(name, step_start_cuts)
    names = {p for p in inspect.signature(rule).parameters if p not in ("batch", "ctx")}
    return rule(batch, ctx, **{k: v for k, v in hyperparams.items() if k in names})


# ------------------------------------------------------------------------------------------------ sampling
def _prefixes(batch: RolloutBatch, cuts: Tensor, fill: Tensor) -> tuple[dict[tuple, int], list[list[int]], Tensor]:
    """Distinct states to sample: key -> index, the response prefix of each, and each cut's index [B,C] (-1 none)."""
    prompts = [row[m].tolist() for row, m in zip(batch.prompt_ids.cpu(), batch.prompt_mask.cpu())]
    ids = batch.response_ids.cpu().tolist()
    groups = batch.group_ids.cpu().tolist()
    keys: dict[tuple, int] = {}
    responses: list[list[int]] = []
    which = torch.full(cuts.shape, -1, dtype=torch.long)
    for b, row in enumerate(cuts.cpu().tolist()):
        for j, c in enumerate(row):
            if c < 0 or bool(fill[b, j]):
                continue
            key = (groups[b], tuple(prompts[b]), tuple(ids[b][:c]))
            if key not in keys:
                keys[key] = len(keys)
                responses.append(ids[b][:c])
            which[b, j] = keys[key]
    return keys, responses, which


def continuation_values(batch: RolloutBatch, cuts: Tensor, ctx: Any, *, samples: int, sampling: Any,
                        fill: Tensor | None = None, unfinished_penalty: float | None = 0.0, max_rows: int = 256,
                        seed: int | None = None) -> MCValues:
    """Mean task reward of `samples` continuations at every cut (see the module docstring).

    `ctx` needs `policy`, `task` and `problems` (indexed by group id, as the trainer builds them); `sampling` is a
    `creditlab.rollout.hf.SamplingConfig` whose max_new_tokens is the whole response budget. `fill` [B,C] marks cuts
    whose value is the row's reward instead of a sample. Deterministic given `seed` (default ``ctx.seed``).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if batch.prompt_ids is None or batch.prompt_mask is None:
        raise ValueError("Monte-Carlo values need RolloutBatch.prompt_ids / prompt_mask (the rollout engine's)")
    if getattr(ctx, "task", None) is None or not getattr(ctx, "problems", None):
        raise ValueError("Monte-Carlo values need the task and the problems (SignalContext.task / .problems)")
    fill = torch.zeros_like(cuts, dtype=torch.bool) if fill is None else fill.cpu()
    keys, responses, which = _prefixes(batch, cuts, fill)
    rewards = _sample_and_score(batch, list(keys), responses, ctx, samples=samples, sampling=sampling,
                                unfinished_penalty=unfinished_penalty, max_rows=max_rows,
                                seed=ctx.seed if seed is None else seed)  # [U, K]
    mean = rewards.mean(dim=1) if len(keys) else torch.zeros(0, dtype=torch.float64)
    se = rewards.std(dim=1) / math.sqrt(samples) if samples > 1 and len(keys) else torch.zeros_like(mean)
    has = which >= 0
    idx = which.clamp_min(0)
    values = torch.where(has, mean[idx] if len(keys) else torch.zeros(which.shape, dtype=torch.float64), 0.0)
    R = batch.rewards.detach().cpu().double()[:, None].expand(which.shape)
    values = torch.where(fill & (cuts.cpu() >= 0), R, values)
    stderr = torch.where(has, se[idx] if len(keys) else torch.zeros(which.shape, dtype=torch.float64), 0.0)
    dev = batch.response_ids.device
    return MCValues(cuts=cuts.to(dev), values=values.float().to(dev),
                    counts=torch.where(has, torch.full_like(which, samples), torch.zeros_like(which)).to(dev),
                    stderr=stderr.float().to(dev))


def _chunk_seed(seed: int, i: int) -> int:
    return (seed * 1_000_003 + (i + 1) * 7_919 + 17) % (2**31 - 1)


def _sample_and_score(batch: RolloutBatch, keys: list[tuple], responses: list[list[int]], ctx: Any, *, samples: int,
                      sampling: Any, unfinished_penalty: float | None, max_rows: int, seed: int) -> Tensor:
    """[U, K] float64 rewards of K continuations of each distinct state (U = len(keys))."""
    from creditlab.rollout.hf import continue_from

    policy, task = ctx.policy, ctx.task
    stops = set(policy.stop_ids)
    budget = [max(1, sampling.max_new_tokens - len(r)) for r in responses]  # the response budget left
    order = sorted(range(len(keys)), key=lambda i: -budget[i])  # similar budgets share a chunk (less waste)
    per_chunk = max(1, max_rows // samples)
    out = torch.zeros(len(keys), samples, dtype=torch.float64)
    kept_tokens = 0
    for ci, start in enumerate(range(0, len(order), per_chunk)):
        chunk = order[start:start + per_chunk]
        cfg = dataclasses.replace(sampling, max_new_tokens=max(budget[i] for i in chunk))
        conts = continue_from(policy, [list(keys[i][1]) + responses[i] for i in chunk], samples, cfg,
                              seed=_chunk_seed(seed, ci))
        for i, rows in zip(chunk, conts):
            group, resp = keys[i][0], responses[i]
            for j, cont in enumerate(rows):
                cont = cont[: budget[i]]  # the chunk may allow more than this prefix's budget: never count it
                kept_tokens += len(cont)
                finished = any(t in stops for t in cont)
                if not finished and unfinished_penalty is not None:
                    out[i, j] = unfinished_penalty
                    continue
                text = policy.tokenizer.decode(resp + cont, skip_special_tokens=True)
                out[i, j] = float(task.score(ctx.problems[group], text).reward)
    ctx.count("samples/extra", len(keys) * samples)
    ctx.count("tokens/extra", kept_tokens)
    ctx.count("mc/prefixes", len(keys))
    ctx.count("mc/prefix_tokens", sum(len(k[1]) + len(r) for k, r in zip(keys, responses)))
    return out


def produce_mc(batch: RolloutBatch, ctx: Any, name: str, hyperparams: dict[str, Any], *, samples: int,
               sampling: Any, unfinished_penalty: float | None = 0.0, max_rows: int = 256,
               seed: int | None = None) -> tuple[RolloutBatch, MCValues]:
    """mc_cuts and mc_values for estimator `name` (its cut rule, then `continuation_values`)."""
    cuts, fill = cuts_for(name, batch, ctx, hyperparams)
    est = continuation_values(batch, cuts, ctx, samples=samples, sampling=sampling, fill=fill,
                              unfinished_penalty=unfinished_penalty, max_rows=max_rows, seed=seed)
    return batch.replace(mc_cuts=est.cuts, mc_values=est.values), est
