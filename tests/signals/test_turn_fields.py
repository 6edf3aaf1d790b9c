"""The turn plumbing the TRL and verl integrations share (`integrations._signals`): turns from an action mask,
per-turn lists checked against them. Core tests: no framework needed."""

import pytest
import torch

from creditlab.envs.base import state_hash
from creditlab.integrations._signals import TURN_FIELDS, turn_ids_from_mask, turn_values


def test_turn_fields_are_checked_per_row():
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]]).bool()
    turns = turn_ids_from_mask(mask)
    assert turns.tolist() == [[0, 0, -1, 1, -1], [0, -1, -1, -1, -1]]
    got = turn_values("turn_rewards", [[0.5, 1.0], [2.0]], turns, source="row_fields['turn_rewards']")
    assert got.tolist() == [[0.5, 1.0], [2.0, 0.0]]
    with pytest.raises(ValueError, match="row 1, which has 1 turn"):
        turn_values("turn_rewards", [[0.5, 1.0], [2.0, 3.0]], turns, source="row_fields['turn_rewards']")
    with pytest.raises(ValueError, match="finite"):
        turn_values("turn_rewards", [[0.5, float("inf")], [2.0]], turns, source="x")
    masked = turn_ids_from_mask(torch.tensor([[1, 0, 1], [0, 0, 0]]).bool())  # row 1 masked out (truncated)
    assert turn_values("turn_rewards", [[1.0, 2.0], [3.0, 4.0, 5.0]], masked, source="x").tolist() == [[1, 2], [0, 0]]
    states = turn_values("anchor_states", [["s0", "s1"], [7]], turns, source="x")
    assert states[0, 0] != states[0, 1] and states[1, 0] == 7
    assert states[0, 0] == state_hash("s0")  # the environments' own hash
    assert set(TURN_FIELDS) == {"turn_rewards", "anchor_states", "answer_probs"}
