"""Token-level rewards for critic-based estimators (PPO-GAE, MA-RLHF, POAD, ArCHer's critic): the outcome on the last
valid token (on multi-turn rows with `turn_rewards`, each turn's reward on that turn's last token), optionally minus a
per-token KL penalty to the reference model (verl's `algorithm.use_kl_in_reward`).

    r = outcome_to_token_rewards(batch.rewards, batch.response_mask)                       # [B, T]
    r = outcome_to_token_rewards(batch.rewards, batch.response_mask,
                                 logprobs=batch.logprobs, ref_logprobs=batch.ref_logprobs, kl_coef=0.001)

Reference: verl `ray_trainer.apply_kl_penalty` (token_level_rewards = token_level_scores - beta * kld, with kld the
"kl" (k1) estimator logp - ref_logp on valid tokens and the score on the last valid token); MA-RLHF's
`compute_rewards` computes the same (-kl_ctl * (logp - ref_logp), score added on the last token).
Differences: no reward clipping (MA-RLHF clips a reward-model score to +-2.5; task verifiers here score in [0, 1]) and
a fixed coefficient (verl's default `kl_ctrl.type=fixed`; the adaptive controller is not offered).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch


def last_valid_index(mask: Tensor) -> Tensor:
    """Column of each row's last valid token [B] long (0 for rows without one; check `mask.any(1)`)."""
    T = mask.shape[1]
    pos = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask, pos, torch.full_like(pos, -1)).amax(dim=1).clamp_min(0)


def outcome_to_token_rewards(rewards: Tensor, mask: Tensor, *, logprobs: Tensor | None = None,
                             ref_logprobs: Tensor | None = None, kl_coef: float = 0.0) -> Tensor:
    """Token rewards [B, T] float32: R_b on the last valid token of row b, minus kl_coef * (logp - ref_logp) on every
    valid token when kl_coef > 0; exactly 0 outside `mask`. A row with no valid token gets all zeros (its outcome has
    no token to sit on)."""
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    mask = mask.to(torch.bool)
    last = last_valid_index(mask)  # [B]
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    out.scatter_(1, last[:, None], rewards.to(torch.float32)[:, None])
    out = out * mask.any(dim=1, keepdim=True)
    if kl_coef > 0:
        if logprobs is None or ref_logprobs is None:
            raise ValueError("a KL reward (kl_coef > 0) needs RolloutBatch.logprobs and RolloutBatch.ref_logprobs")
        out = out - kl_coef * (logprobs.float() - ref_logprobs.float())
    return torch.where(mask, out, torch.zeros((), device=mask.device))


def turn_rewards_to_token_rewards(turn_rewards: Tensor, turn_ids: Tensor, mask: Tensor) -> Tensor:
    """[B, T] float32: turn k's reward (turn_rewards [B, N]) on the last valid token of turn k; a turn with no valid
    token adds its reward to the row's last valid token (so each row still sums to its turns' total)."""
    mask = mask.to(torch.bool)
    B, T = mask.shape
    N = turn_rewards.shape[1]
    pos = torch.arange(T, device=mask.device).expand(B, T)
    tid = torch.where(mask & (turn_ids >= 0), turn_ids, N)  # column N collects tokens outside any turn
    last = torch.full((B, N + 1), -1, dtype=torch.long, device=mask.device).scatter_reduce(
        1, tid, torch.where(mask, pos, -1), "amax")[:, :N]  # [B, N] last column of each turn, -1 if none
    last = torch.where(last >= 0, last, last_valid_index(mask)[:, None])
    out = torch.zeros(B, T, dtype=torch.float32, device=mask.device)
    out.scatter_add_(1, last, turn_rewards.float())
    return torch.where(mask, out, torch.zeros((), device=mask.device))


def token_rewards(batch: RolloutBatch, ctx: Any) -> dict[str, Tensor]:
    """Producer (``PRODUCERS["token_rewards"]``): outcome on the last token (on multi-turn rows with `turn_rewards`:
    each turn's reward on the turn's last token), minus `--critic-kl-in-reward` x k1-KL on every valid token.

    The KL uses the rollout's `logprobs` (the behaviour policy's, fp32 sampling matches the trainer's recomputation to
    ~1e-5; under `--bf16` sampling they carry bf16 noise) and the trainer's `ref_logprobs` (computed when the run
    sets a KL reward)."""
    cfg = getattr(ctx, "cfg", None)
    critic = getattr(cfg, "critic", None)
    beta = float(getattr(critic, "critic_kl_in_reward", 0.0)) if critic is not None else 0.0
    mask = batch.response_mask
    if batch.turn_rewards is not None and batch.turn_ids is not None:
        rewards = batch.rewards.new_zeros(batch.B)  # the outcome is the turns' rewards, placed per turn below
        per_turn = turn_rewards_to_token_rewards(batch.turn_rewards, batch.turn_ids, mask)
    else:
        rewards, per_turn = batch.rewards, None
    out = outcome_to_token_rewards(rewards, mask, logprobs=batch.logprobs, ref_logprobs=batch.ref_logprobs,
                                   kl_coef=beta)
    return {"token_rewards": out if per_turn is None else out + per_turn}
