"""Budget credit: brpo (anytime reasoning), hbpo (hierarchical budgets), vsrm (verifiable stepwise reward).

All three read the response's *length* as part of the credit:
- brpo: the response is cut at K budgets; `cut_scores[b,k]` is the mean score of answers sampled after cut k
  (`creditlab.signals.budget`). Thinking segment k (tokens between budget k-1 and k) gets the budget-weighted
  return of the budgets it reaches, minus a baseline mixing its own earlier results with the group's.
- hbpo: each response was sampled under a budget-prefixed prompt (`think_budget`); a length-aware reward and an
  intra-budget baseline shape a GRPO advantage.
- vsrm: the response is cut at each step boundary; step k's reward is the change in answer accuracy it caused.

Shapes: B rows, T tokens, K cut columns (`cut_lens`, `cut_scores`; -1 pads unused columns at the end).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.credit.ops import (
    Singleton,
    broadcast,
    compact_left,
    discounted_reverse_cumsum,
    group_index,
    group_stats,
    masked_whiten,
)
from creditlab.credit.outcome import group_advantage
from creditlab.registry import estimator

Prior = Literal["uniform", "linear", "base"]
Baseline = Literal["brpo", "v1only", "v2only", "none"]
_F64 = torch.float64


# ------------------------------------------------------------------------------------------------ shared helpers
def check_cuts(cut_lens: Tensor, name: str) -> Tensor:
    """Valid-column mask [B,K] of `cut_lens`; raises unless every row is non-decreasing with -1 only at the end."""
    valid = cut_lens >= 0
    if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
        raise ValueError(f"{name} needs RolloutBatch.cut_lens padded with -1 only after the last used column")
    both = valid[:, 1:] & valid[:, :-1]
    if bool(((cut_lens[:, 1:] < cut_lens[:, :-1]) & both).any()):
        raise ValueError(f"{name} needs RolloutBatch.cut_lens non-decreasing along each row (cuts in order)")
    return valid


def _token_index(mask: Tensor) -> Tensor:
    """Index of each valid token among its row's valid tokens (0, 1, ...) [B,T] long; -1 outside `mask`."""
    return torch.where(mask, mask.long().cumsum(1) - 1, torch.full_like(mask, -1, dtype=torch.long))


# ------------------------------------------------------------------------------------------------ BRPO
def budget_prior(cut_lens: Tensor, valid: Tensor, prior: str) -> Tensor:
    """p [B,K] float64 over each row's valid budgets: uniform, linear (proportional to the budget) or base (all mass
    on the last budget); normalised to sum 1 (brpo.py `set_training_split_plan`, then `budget_probs /= sum`)."""
    v = valid.to(_F64)
    if prior == "uniform":
        w = v
    elif prior == "linear":
        w = cut_lens.clamp_min(0).to(_F64) * v
    elif prior == "base":
        last = (valid.long().cumsum(1) == valid.sum(1, keepdim=True)) & valid
        w = last.to(_F64)
    else:
        raise ValueError(f"prior must be 'uniform', 'linear' or 'base', got {prior!r}")
    total = w.sum(1, keepdim=True)
    return torch.where(total > 0, w / total.clamp_min(1e-300), torch.zeros_like(w))


def brpo_segment_advantages(scores: Tensor, p: Tensor, valid: Tensor, group_ids: Tensor, *, baseline: str,
                            history_base: float, singleton: str) -> tuple[Tensor, dict[str, Tensor]]:
    """BRPO's per-segment advantage A [B,K] (brpo.py `compute_cot_advantage`, vectorized) and its parts.

    R_s = sum_{j>=s} p_j r_j; V2_s = mean over the group's rows of R_s; V1_s = (sum_{j<s} h^j r_j / sum_{j<s} h^j)
    * sum_{j>=s} p_j (0 at s = 0); baseline "brpo" = (s V1 + (S - s) V2) / S, or V1, V2, 0.
    """
    r = torch.where(valid, scores.to(_F64), torch.zeros((), dtype=_F64))  # [B,K]
    R = (p * r).flip(1).cumsum(1).flip(1)  # [B,K]
    tail = p.flip(1).cumsum(1).flip(1)  # sum_{j>=s} p_j
    K = r.shape[1]
    h = history_base ** torch.arange(K, dtype=_F64)  # [K]
    num = torch.cat([torch.zeros_like(r[:, :1]), (r * h).cumsum(1)[:, :-1]], dim=1)  # sum_{j<s} h^j r_j
    den = torch.cat([torch.zeros(1, dtype=_F64), h.cumsum(0)[:-1]])  # sum_{j<s} h^j
    v1 = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)) * tail
    idx, n_groups = group_index(group_ids)
    cnt = torch.zeros(n_groups, K, dtype=_F64).index_add_(0, idx, valid.to(_F64))  # rows with budget s
    tot = torch.zeros(n_groups, K, dtype=_F64).index_add_(0, idx, torch.where(valid, R, torch.zeros_like(R)))
    v2 = (tot / cnt.clamp_min(1))[idx]  # [B,K]
    S = valid.sum(1, keepdim=True).to(_F64)  # [B,1] the row's number of budgets
    s = torch.arange(K, dtype=_F64)[None, :]
    single = (torch.zeros(n_groups, dtype=_F64).index_add_(0, idx, torch.ones(len(idx), dtype=_F64)) == 1)[idx]
    v2 = torch.where(single[:, None], torch.zeros_like(v2), v2)  # brpo.py: avg_return = 0 when G == 1
    base = {"brpo": (s * v1 + (S - s) * v2) / S.clamp_min(1), "v1only": v1, "v2only": v2,
            "none": torch.zeros_like(R)}
    if baseline not in base:
        raise ValueError(f"baseline must be one of {list(base)}, got {baseline!r}")
    adv = torch.where(valid, R - base[baseline], torch.zeros_like(R))
    if singleton == "zero":
        adv = torch.where(single[:, None], torch.zeros_like(adv), adv)
    return adv, {"returns": R, "v1": v1, "v2": v2}


def segment_of_tokens(cut_lens: Tensor, valid: Tensor, mask: Tensor) -> Tensor:
    """Budget segment of each valid token [B,T] long: #{s : b_s <= i} for token index i, clamped to the row's last
    budget (tokens beyond the last budget join the last segment); -1 outside `mask` or for rows without budgets."""
    i = _token_index(mask)  # [B,T]
    b = torch.where(valid, cut_lens, torch.full_like(cut_lens, torch.iinfo(torch.long).max))  # [B,K]
    seg = (b[:, None, :] <= i[:, :, None]).sum(-1)  # [B,T]
    last = (valid.sum(1, keepdim=True) - 1)  # [B,1]
    seg = torch.minimum(seg, last.clamp_min(0))
    return torch.where(mask & (last >= 0), seg, torch.full_like(seg, -1))


@estimator("brpo", needs=("cut_lens", "cut_scores"), ranges={"history_base": "(0, inf)"})
def brpo(batch: RolloutBatch, *, prior: Prior = "uniform", baseline: Baseline = "brpo", history_base: float = 2.0,
         singleton: Singleton = "zero") -> Credit:
    """BRPO: credit each thinking segment with the budget-weighted answer scores it leads to (anytime reasoning).

    Paper: "Optimizing Anytime Reasoning via Budget Relative Policy Optimization" (arXiv 2505.13438).
    Reference: sail-sg/AnytimeReasoner verl/verl/trainer/ppo/brpo.py @7e3f5bb, `compute_cot_advantage` (matched)
    and `compute_token_level_advantage` (segment -> tokens).
    Shapes: cut_lens [B,K] (budgets b_0 < ... in tokens, -1 padding), cut_scores [B,K] (mean summary score
    rbar_s after cutting at b_s), group_ids [B] -> advantages [B,T].
    Formula: p = budget prior; R_s = sum_{j>=s} p_j rbar_j; V2_s = group mean of R_s; V1_s = (sum_{j<s} 2^j rbar_j /
    sum_{j<s} 2^j) sum_{j>=s} p_j; baseline = (s V1 + (S-s) V2)/S ("brpo"), V1, V2 or 0; A_s = R_s - baseline,
    no std division. Token i (0-based among valid tokens) belongs to segment s = #{budgets b_s <= i}: the segment
    (b_{s-1}, b_s] of the reference, and a response shorter than b_s puts its tail in the first budget it does not
    reach (the reference's collapsed split).
    Defaults: prior "uniform", baseline "brpo", history base 2.0 (reference constants, now parameters).
    Deviations: tokens after the last budget (only when the budgets stop below --max-new-tokens) join the last
    segment; the reference's last budget is the generation limit. A singleton group gets 0 (`singleton="zero"`);
    `"raw"` gives the reference (V2 = 0 when G = 1). Summary tokens are trained by the budget component
    (`creditlab.signals.budget`, `summary_advantages`), not through this [B,T] output. No hard-coded token ids.
    """
    if not history_base > 0:
        raise ValueError(f"history_base must be > 0 (2.0 in the reference), got {history_base}")
    if singleton not in ("zero", "raw"):
        raise ValueError(f"singleton must be 'zero' or 'raw', got {singleton!r}")
    valid = check_cuts(batch.cut_lens, "brpo")
    p = budget_prior(batch.cut_lens, valid, prior)
    seg_adv, parts = brpo_segment_advantages(batch.cut_scores, p, valid, batch.group_ids, baseline=baseline,
                                             history_base=history_base, singleton=singleton)
    seg = segment_of_tokens(batch.cut_lens, valid, batch.response_mask)  # [B,T]
    adv = torch.where(seg >= 0, seg_adv.gather(1, seg.clamp_min(0)), torch.zeros((), dtype=_F64))
    adv = torch.where(batch.response_mask, adv, torch.zeros_like(adv)).to(torch.float32)
    n = max(int(valid.sum()), 1)
    metrics = advantage_metrics(adv, batch.response_mask, **{
        "budget_score_mean": float(torch.where(valid, batch.cut_scores.to(_F64), 0).sum()) / n,
        "budget_anytime_return": float(parts["returns"][:, 0].mean())})
    return Credit(advantages=adv, metrics=metrics)


def summary_advantages(scores: Tensor, prefix_ids: Tensor, group_budget_ids: Tensor, n_answers: int) -> Tensor:
    """Advantage of each sampled summary [N] (brpo.py `compute_summary_advantage`, method "brpo").

    A > 1 answers per prefix: score - mean of the scores sampled from the same prefix (row, cut); a prefix with a
    single score gets baseline 0 (the reference's `grpo_id2mean` for len 1). A = 1: score - mean over the summaries
    of the same (group, budget) (the reference's GRPO baseline across the G responses).
    """
    if scores.numel() == 0:
        return scores.to(_F64)
    keys = prefix_ids if n_answers > 1 else group_budget_ids
    mean, _, count, _ = group_stats(scores, keys)
    base = torch.where((count > 1) | torch.tensor(n_answers == 1), mean, torch.zeros_like(mean))
    return scores.to(_F64) - base


# ------------------------------------------------------------------------------------------------ HBPO
def hbpo_reward(correct: Tensor, length: Tensor, budget: Tensor, fallback: Tensor, *, beta: float, l_max: int,
                alpha: float, piecewise: bool = False) -> Tensor:
    """HBPO's budget-aware reward [B] float64 (rllm/rewards/math_reward.py in ZJU-REAL/HBPO).

    Correct and L <= l_max: min(beta cos(pi L / (2 l_max)) - alpha |b - L|, beta cos(pi b / (2 l_max))) (the
    code); `piecewise=True` gives the paper's eq.: f1 if L > b else f2. Correct but longer than l_max: 0 (the
    reference falls through to `incorrect_reward`). Wrong: `fallback` (the task's reward).
    """
    L, b = length.to(_F64), budget.to(_F64)
    f1 = beta * torch.cos(math.pi * L / (2 * l_max)) - alpha * (b - L).abs()
    f2 = beta * torch.cos(math.pi * b / (2 * l_max))
    shaped = torch.where(L > b, f1, f2) if piecewise else torch.minimum(f1, f2)
    ok = correct & (L <= l_max)
    return torch.where(ok, shaped, torch.where(correct, torch.zeros_like(L), fallback.to(_F64)))


@estimator("hbpo", needs=("think_budget", "correct"),
           ranges={"beta": "(0, inf)", "l_max": "[1, inf)", "alpha": "[0, inf)", "eps": "[0, inf)"})
def hbpo(batch: RolloutBatch, *, beta: float = 4.0, l_max: int = 4096, alpha: float | None = None,
         piecewise: bool = False, eps: float = 1e-6, singleton: Singleton = "zero") -> Credit:
    """HBPO: budget-aware reward, GRPO z-score over the whole group plus an intra-budget term.

    Paper: "Hierarchical Budget Policy Optimization for Adaptive Reasoning" (arXiv 2507.15844), Algorithm 1.
    Reference: ZJU-REAL/HBPO rllm/rewards/math_reward.py (reward) and verl/trainer/ppo/core_algos.py
    `compute_grpo_outcome_advantage` (advantage), read at commit 5c8991d.
    Shapes: think_budget [B] (budget in the prompt), correct [B] bool, rewards [B] (task reward, used for wrong
    answers), response_mask (length L) -> advantages [B,T].
    Formula: R = hbpo_reward(correct, L, b) with f(x) = beta cos(pi x / (2 l_max)); A = (R - mean_g R) /
    (std_g R + eps) + (mean_{g,b} R - f(b)), std unbiased, broadcast to tokens. The second term is the paper's
    A^intra = mu_i - R_{b_i}; the first is A^inter.
    Defaults: beta = 4, l_max = 4096 (the reference's context window, also its length limit), alpha = 1/l_max;
    the reward is the code's min(f1, f2); `piecewise=True` is the paper's eq. (f1 above the budget, f2 within it),
    which differs only where f1 < f2 within the budget (budgets below ~l_max/10).
    At CPU scale pass l_max near --max-new-tokens (e.g. '{"l_max": 256}'), or every budget looks tiny.
    Deviations / reference bugs not copied: the intra term is added once (the reference adds it twice), the row's
    own budget is used (the reference calls `.item()` on a [T] row), singleton groups get no intra term (the
    reference reuses a stale value) and A = 0 by default (`singleton="raw"` gives R, the reference's mean 0 /
    std 1); pi exactly (reference 3.1416, < 1e-5 relative); the budget prefix sits in the prompt, so L excludes it
    (the reference prefills it into the response and counts it); wrong answers get the task's reward (the
    reference: 0, or -1 for a format error).
    """
    if l_max < 1 or not beta > 0:
        raise ValueError(f"hbpo needs l_max >= 1 and beta > 0, got l_max={l_max}, beta={beta}")
    if alpha is not None and alpha < 0:
        raise ValueError(f"alpha must be >= 0 (deviation penalty per token; default 1/l_max), got {alpha}")
    if int(batch.think_budget.max()) > l_max:
        raise ValueError(f"hbpo: think_budget reaches {int(batch.think_budget.max())} > l_max={l_max}; pass l_max >= "
                         "the largest budget (the reference: budgets <= 2560, l_max = 4096)")
    a_dev = 1.0 / l_max if alpha is None else alpha
    length = batch.response_mask.sum(1)
    R = hbpo_reward(batch.correct, length, batch.think_budget, batch.rewards, beta=beta, l_max=l_max, alpha=a_dev,
                    piecewise=piecewise)
    inter = group_advantage(R, batch.group_ids, eps=eps, singleton=singleton)  # [B] z-score, 0 for constant groups
    key = torch.stack([batch.group_ids, batch.think_budget], dim=1)
    sub_mean, _, _, _ = group_stats(R, torch.unique(key, dim=0, return_inverse=True)[1])
    f_b = beta * torch.cos(math.pi * batch.think_budget.to(_F64) / (2 * l_max))
    _, _, count, _ = group_stats(R, batch.group_ids)
    intra = torch.where(count > 1, sub_mean - f_b, torch.zeros_like(f_b))
    a = inter + intra
    if singleton == "zero":
        a = torch.where(count > 1, a, torch.zeros_like(a))
    adv = broadcast(a, batch.response_mask)
    metrics = advantage_metrics(adv, batch.response_mask, **{
        "hbpo_reward_mean": float(R.mean()), "hbpo_intra_mean": float(intra.mean())})
    return Credit(advantages=adv, metrics=metrics)


# ------------------------------------------------------------------------------------------------ VSRM
def vsrm_step_rewards(cut_scores: Tensor, valid: Tensor, *, lookahead: int, decay: float) -> Tensor:
    """d_k = acc_k - acc_{k-1} for k >= 1 (0 at k = 0 and in padding) [B,K] float64; with `lookahead` W > 0 a zero
    d_k takes decay^(j-k) d_j from the first j in (k, k + W] with d_j != 0 (reconstructed, see `vsrm`)."""
    acc = cut_scores.to(_F64)
    d = torch.zeros_like(acc)
    both = valid[:, 1:] & valid[:, :-1]
    d[:, 1:] = torch.where(both, acc[:, 1:] - acc[:, :-1], torch.zeros_like(acc[:, 1:]))
    if lookahead <= 0:
        return d
    out, filled = d.clone(), d != 0
    for j in range(1, min(lookahead, d.shape[1]) + 1):  # nearest nonzero future difference first
        ahead = torch.cat([d[:, j:], torch.zeros_like(d[:, :j])], dim=1) if j < d.shape[1] else torch.zeros_like(d)
        take = ~filled & (ahead != 0) & valid & (torch.arange(d.shape[1]) >= 1)
        out = torch.where(take, decay**j * ahead, out)
        filled |= take
    return out


@estimator("vsrm", needs=("cut_lens", "cut_scores"),
           ranges={"step_coef": "[0, inf)", "gamma": "[0, 1]", "lookahead": "[0, inf)", "lookahead_decay": "[0, 1]",
                   "eps": "(0, inf)"})
def vsrm(batch: RolloutBatch, *, step_coef: float = 1.0, gamma: float = 1.0, lookahead: int = 0,
         lookahead_decay: float = 0.5, whiten: bool = True, eps: float = 1e-8) -> Credit:
    """VSRM: step reward = answer accuracy after the step minus before it, on top of the outcome, REINFORCE++.

    Paper: "Promoting Efficient Reasoning with Verifiable Stepwise Reward" (arXiv 2508.10293). No code released.
    Shapes: cut_lens [B,K] (cut points in tokens at step starts, ascending; cut 0 = before the first step),
    cut_scores [B,K] (accuracy of answers sampled after each cut), rewards [B] -> advantages [B,T].
    Formula: d_k = acc_k - acc_{k-1} (k >= 1) is added as a token reward on the last token before cut k (the end of
    the step between cuts k-1 and k); the outcome R_b on the last valid token; returns = reverse cumulative sum
    with discount gamma; A = masked_whiten(returns) over the batch (verl REINFORCE++, which the paper trains with).
    Defaults: step_coef = 1, gamma = 1, whiten = True; lookahead = 0 (no propagation).
    Reconstructed (paper text not available to us; methods.md §12.2): the reward placement, the baseline cut 0
    (the producer samples answers from the prompt alone), and the optional lookahead: with lookahead W > 0, a
    step with d_k = 0 takes decay^(j-k) d_j of the first later step j <= k + W whose accuracy changed. Treat
    lookahead as unverified. Cuts at or past the response end put their reward on the last token.
    """
    if lookahead < 0 or not 0.0 <= lookahead_decay <= 1.0 or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"vsrm needs lookahead >= 0, 0 <= lookahead_decay <= 1 and 0 <= gamma <= 1, got "
                         f"lookahead={lookahead}, lookahead_decay={lookahead_decay}, gamma={gamma}")
    mask = batch.response_mask
    valid = check_cuts(batch.cut_lens, "vsrm")
    d = vsrm_step_rewards(batch.cut_scores, valid, lookahead=lookahead, decay=lookahead_decay)  # [B,K]
    L = mask.sum(1, keepdim=True)  # [B,1]
    pos = torch.minimum(batch.cut_lens, L) - 1  # [B,K] token index (among valid tokens) of the step's last token
    ok = valid & (pos >= 0) & (torch.arange(d.shape[1])[None, :] >= 1)
    n_valid = mask.shape[1]
    r_compact = torch.zeros(mask.shape[0], n_valid + 1, dtype=_F64)  # column n_valid swallows skipped rewards
    r_compact.scatter_add_(1, torch.where(ok, pos, n_valid), torch.where(ok, step_coef * d, 0.0))
    last = (L - 1).clamp_min(0)
    r_compact.scatter_add_(1, torch.where(L > 0, last, n_valid), batch.rewards.to(_F64)[:, None])
    r_compact = r_compact[:, :n_valid]  # [B,T] rewards in compacted (valid-token) order
    order, cmask = compact_left(mask)
    ret_c = discounted_reverse_cumsum(torch.where(cmask, r_compact, 0.0), gamma)  # [B,T]
    returns = torch.zeros_like(ret_c).scatter(1, order, torch.where(cmask, ret_c, 0.0))
    adv = masked_whiten(returns, mask, eps=eps) if whiten else torch.where(mask, returns, 0.0)
    adv = torch.where(mask, adv, torch.zeros_like(adv)).to(torch.float32)
    metrics = advantage_metrics(adv, mask, **{
        "vsrm_step_reward_mean": float(torch.where(ok, d, 0.0).sum()) / max(int(ok.sum()), 1),
        "vsrm_steps_per_row": float(ok.sum()) / max(batch.B, 1)})
    return Credit(advantages=adv, returns=torch.where(mask, returns, 0.0).to(torch.float32), metrics=metrics)
