"""Turn fields for single-turn batches: a response is a one-turn episode, so the agent estimators run on any task.

Producers (`signals.produce.PRODUCERS`) for ``turn_ids``, ``turn_rewards``, ``anchor_states`` and ``answer_probs``
when the rollout was single-turn (multi-turn rollouts fill the first three themselves, and the agent component fills
``answer_probs`` with the environment's answer template):

    turn_ids = 0 on the response's tokens (-1 elsewhere); turn_rewards = [R]; anchor_states = an id of the prompt
    (the one state every response of a group starts from); answer_probs = [P(gold answer | prompt)].

On such rows igpo and mt_grpo reduce to GRPO and gigpo (mean_norm) to twice the centred reward (tested).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch


def single_turn_fields(batch: RolloutBatch) -> dict[str, Tensor]:
    """turn_ids [B,T], turn_rewards [B,1], anchor_states [B,1] of one-turn episodes."""
    fields: dict[str, Tensor] = {"turn_ids": torch.where(batch.response_mask, 0, -1),
                                 "turn_rewards": batch.rewards[:, None].float()}
    if batch.prompt_ids is not None and batch.prompt_mask is not None:
        keyed = torch.where(batch.prompt_mask, batch.prompt_ids, -1)
        fields["anchor_states"] = torch.unique(keyed, dim=0, return_inverse=True)[1][:, None]
    else:
        fields["anchor_states"] = batch.group_ids[:, None].clone()
    return fields


def single_turn_producer(batch: RolloutBatch, ctx: Any) -> dict[str, Tensor]:
    """Producer for turn_ids / turn_rewards / anchor_states (one-turn episodes)."""
    return single_turn_fields(batch)


def single_turn_answer_probs(batch: RolloutBatch, ctx: Any) -> dict[str, Tensor]:
    """Producer for answer_probs on single-turn rows: P(the problem's gold answer | prompt), teacher-forced."""
    from creditlab.signals.info_gain import answer_probs

    if batch.turn_ids is None:
        batch = batch.replace(**single_turn_fields(batch))
    answers = [ctx.problems[g].answer for g in batch.group_ids.tolist()]
    cfg = getattr(ctx, "cfg", None)
    temperature = cfg.rollout.temperature if cfg is not None else 1.0
    probs, n_tokens = answer_probs(ctx.policy, batch, answers, template="{answer}", temperature=temperature)
    if hasattr(ctx, "count"):
        ctx.count("tokens/extra", n_tokens)
    return {"answer_probs": probs, "turn_ids": batch.turn_ids}
