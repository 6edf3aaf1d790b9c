"""Token rewards for critic estimators (creditlab.signals.rewards): outcome placement, KL reward, per-turn rewards."""

import pytest
import torch

from creditlab.batch import RolloutBatch
from creditlab.signals.rewards import outcome_to_token_rewards, token_rewards, turn_rewards_to_token_rewards


def test_outcome_on_the_last_valid_token_and_the_k1_kl_reward():
    mask = torch.tensor([[True, True, False, True, False], [False] * 5, [True, False, False, False, False]])
    r = outcome_to_token_rewards(torch.tensor([1.0, 2.0, -1.0]), mask)
    # row 0: last valid column 3; row 1 has no token (its reward has nowhere to go); row 2: column 0
    assert r.tolist() == [[0, 0, 0, 1, 0], [0] * 5, [-1, 0, 0, 0, 0]]
    logp, ref = torch.full((3, 5), -1.0), torch.full((3, 5), -1.5)
    # verl apply_kl_penalty with kl_penalty="kl": r_t -= beta * (logp - ref_logp) = 0.1 * 0.5 on every valid token
    kl = outcome_to_token_rewards(torch.tensor([1.0, 2.0, -1.0]), mask, logprobs=logp, ref_logprobs=ref, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.where(mask, r - 0.05, 0.0))
    with pytest.raises(ValueError, match="ref_logprobs"):
        outcome_to_token_rewards(torch.ones(3), mask, kl_coef=0.1)


def test_turn_rewards_sit_on_each_turns_last_token():
    # turn 0 = cols 0-1, observation at 2 (masked), turn 1 = col 3; turn 2 has no token -> row's last token.
    mask = torch.tensor([[True, True, False, True, False]])
    turn_ids = torch.tensor([[0, 0, -1, 1, -1]])
    out = turn_rewards_to_token_rewards(torch.tensor([[0.5, -0.1, 0.2]]), turn_ids, mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.0, 0.1, 0.0]]))
    batch = RolloutBatch(response_ids=torch.ones(1, 5, dtype=torch.long), response_mask=mask,
                         group_ids=torch.zeros(1, dtype=torch.long), rewards=torch.tensor([0.6]), turn_ids=turn_ids,
                         turn_rewards=torch.tensor([[0.5, -0.1, 0.2]]))
    torch.testing.assert_close(token_rewards(batch, None)["token_rewards"], out)  # the producer uses them
    single = batch.replace(turn_ids=None, turn_rewards=None)
    torch.testing.assert_close(token_rewards(single, None)["token_rewards"], torch.tensor([[0.0, 0.0, 0.0, 0.6, 0.0]]))
