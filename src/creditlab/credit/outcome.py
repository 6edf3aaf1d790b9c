"""Outcome-level estimators: one scalar per response (GRPO, Dr. GRPO, RLOO, REINFORCE++) and PPO's GAE.

Degenerate groups (methods.md §10.2) follow one explicit policy, `singleton="zero" | "raw"`:
- a group of one response gets advantage 0 (`"zero"`, default) or its raw reward R (`"raw"`, verl parity);
- a group whose rewards are all equal (zero variance) gets exactly 0 under every estimator here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.credit.ops import (
    Singleton,
    broadcast,
    compact_left,
    discounted_reverse_cumsum,
    group_stats,
    masked_whiten,
)
from creditlab.registry import estimator


def _check_singleton(singleton: str) -> None:
    if singleton not in ("zero", "raw"):
        raise ValueError(f"singleton must be 'zero' or 'raw', got {singleton!r}")


def group_advantage(rewards: Tensor, group_ids: Tensor, *, scale_by_std: bool = True, eps: float = 1e-6,
                    unbiased: bool = True, singleton: Singleton = "zero") -> Tensor:
    """GRPO's per-response advantage [B] (float64): (R - mean_g) / (std_g + eps), or R - mean_g.

    Shared by `grpo`, `dr_grpo` and every estimator that adds fine-grained terms on top of GRPO.
    """
    _check_singleton(singleton)
    mean, std, count, constant = group_stats(rewards, group_ids, unbiased=unbiased)
    r = rewards.to(torch.float64)
    a = r - mean
    if scale_by_std:
        a = a / (std + eps)
    a = torch.where(constant, torch.zeros_like(a), a)  # exact 0 for zero-variance groups
    single = count == 1
    return torch.where(single, r if singleton == "raw" else torch.zeros_like(a), a)


def _sequence_credit(batch: RolloutBatch, a: Tensor) -> Credit:
    adv = broadcast(a, batch.response_mask)
    return Credit(advantages=adv, metrics=advantage_metrics(adv, batch.response_mask))


@estimator("grpo", ranges={"eps": "[0, inf)"})
def grpo(batch: RolloutBatch, *, eps: float = 1e-6, scale_by_std: bool = True, unbiased: bool = True,
         singleton: Singleton = "zero") -> Credit:
    """GRPO: group-standardized outcome, copied onto every token.

    Paper: DeepSeekMath (arXiv 2402.03300). Reference: verl `compute_grpo_outcome_advantage`.
    Shapes: rewards [B], group_ids [B] -> advantages [B,T].
    Formula: a_b = (R_b - mean_g) / (std_g + eps), std unbiased (n-1); A[b,t] = a_b * m[b,t].
    Defaults: eps=1e-6, scale_by_std=True (False gives Dr. GRPO's advantage), unbiased=True.
    Deviations: verl gives a singleton group its raw reward R; here `singleton="zero"` by default
    ("raw" restores parity). A zero-variance group gives exactly 0 (verl gives (R-mean)/eps, which is 0
    up to rounding). `returns` is not set: GRPO has no value targets.
    """
    a = group_advantage(batch.rewards, batch.group_ids, scale_by_std=scale_by_std, eps=eps,
                        unbiased=unbiased, singleton=singleton)
    return _sequence_credit(batch, a)


@estimator("dr_grpo")
def dr_grpo(batch: RolloutBatch, *, singleton: Singleton = "zero") -> Credit:
    """Dr. GRPO: group-mean-centred outcome without the std division.

    Paper: Understanding R1-Zero-Like Training (arXiv 2503.20783). Reference: verl GRPO with
    `norm_adv_by_std_in_grpo=False`.
    Shapes: rewards [B], group_ids [B] -> advantages [B,T].
    Formula: a_b = R_b - mean_g; A[b,t] = a_b * m[b,t].
    The paper's second change, a constant loss normaliser instead of 1/|o_i|, is a loss aggregation:
    use `seq-mean-token-sum-norm` with an explicit constant (creditlab.train.losses.aggregate).
    Deviations: singleton groups get 0 by default (`singleton="raw"` gives R).
    """
    a = group_advantage(batch.rewards, batch.group_ids, scale_by_std=False, singleton=singleton)
    return _sequence_credit(batch, a)


@estimator("rloo")
def rloo(batch: RolloutBatch, *, singleton: Singleton = "zero") -> Credit:
    """RLOO: reward minus the mean reward of the *other* responses to the same prompt.

    Paper: Back to Basics (arXiv 2402.14740). Reference: verl `compute_rloo_outcome_advantage`.
    Shapes: rewards [B], group_ids [B] -> advantages [B,T].
    Formula: a_b = R_b - (1/(n-1)) sum_{j != b} R_j = n/(n-1) (R_b - mean_g), n the actual group size.
    Deviations: a singleton has no leave-one-out baseline; verl's loop version gives R and its vectorized
    version 0. Default here is 0 (`singleton="zero"`), `"raw"` gives R.
    """
    _check_singleton(singleton)
    mean, _, count, constant = group_stats(batch.rewards, batch.group_ids)
    r = batch.rewards.to(torch.float64)
    a = count / (count - 1).clamp_min(1) * (r - mean)
    a = torch.where(constant, torch.zeros_like(a), a)
    a = torch.where(count == 1, r if singleton == "raw" else torch.zeros_like(a), a)
    return _sequence_credit(batch, a)


@estimator("reinforce_pp", ranges={"eps": "(0, inf)"})
def reinforce_pp(batch: RolloutBatch, *, singleton: Singleton = "zero", eps: float = 1e-8) -> Credit:
    """REINFORCE++-baseline: subtract the group mean, then whiten over all valid tokens of the batch.

    Paper: REINFORCE++ (arXiv 2501.03262). Reference: verl
    `compute_reinforce_plus_plus_baseline_outcome_advantage`.
    Shapes: rewards [B], group_ids [B] -> advantages [B,T].
    Formula: c_b = R_b - mean_g; A = masked_whiten(broadcast(c), m) with the mean and unbiased variance
    over every valid token of the batch (token-weighted: long responses weigh more, as in the reference).
    Whiten once per full batch, never per micro-batch: the trainer calls estimators on the full batch.
    Deviations: singleton groups get c = 0 by default (verl: mu := 0 so c = R; `singleton="raw"`).
    Fewer than two valid tokens in the batch: the variance is taken as 0 (finite result).
    """
    a = group_advantage(batch.rewards, batch.group_ids, scale_by_std=False, singleton=singleton)
    adv = masked_whiten(broadcast(a, batch.response_mask, torch.float64), batch.response_mask, eps=eps)
    adv = adv.to(torch.float32)
    return Credit(advantages=adv, metrics=advantage_metrics(adv, batch.response_mask))


@estimator("gae", needs=("token_rewards", "values"), ranges={"gamma": "[0, 1]", "lam": "[0, 1]"})
def gae(batch: RolloutBatch, *, gamma: float = 1.0, lam: float = 1.0, whiten: bool = True) -> Credit:
    """PPO's generalized advantage estimation over token rewards and critic values.

    Papers: PPO (arXiv 1707.06347), GAE (arXiv 1506.02438). Reference: verl `compute_gae_advantage_return`.
    Shapes: token_rewards [B,T], values [B,T] -> advantages [B,T], returns [B,T].
    Formula (backwards over valid tokens; masked tokens pass V' and g' through unchanged, as for
    observation tokens of multi-turn rows): delta_t = r_t + gamma V' - V_t, g_t = delta_t + gamma lam g',
    with V' = 0 after the last valid token (no bootstrap past EOS). Returns = g + V;
    advantages = masked_whiten(g) (or g when `whiten=False`).
    Defaults (verl): gamma = lam = 1, whiten=True.
    Vectorization: valid tokens are compacted to the left of each row, so the recursion becomes a plain
    discounted reverse cumsum (chunked scan), then scattered back. Rewards on masked tokens are ignored,
    as in verl.
    """
    mask = batch.response_mask
    order, cmask = compact_left(mask)  # [B,T]
    r = batch.token_rewards.to(torch.float64).gather(1, order) * cmask
    v = batch.values.to(torch.float64).gather(1, order) * cmask
    v_next = torch.nn.functional.pad(v[:, 1:], (0, 1)) * torch.nn.functional.pad(cmask[:, 1:], (0, 1))
    delta = (r + gamma * v_next - v) * cmask  # [B,T] compacted
    g_c = discounted_reverse_cumsum(delta, gamma * lam) * cmask
    g = torch.zeros_like(g_c).scatter(1, order, g_c)
    zero = torch.zeros((), dtype=torch.float64)
    returns = torch.where(mask, g + batch.values.to(torch.float64), zero)
    adv = masked_whiten(g, mask) if whiten else torch.where(mask, g, zero)
    adv = adv.to(torch.float32)
    return Credit(advantages=adv, returns=returns.to(torch.float32), metrics=advantage_metrics(adv, mask))
