"""The reward function of the CPU verl step (`reward.custom_reward_function.path`): a toy score, plus one score per
";"-separated step in the reward's extra info (verl's idiom for extra reward outputs)."""

from __future__ import annotations

import re


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    words = solution_str.split()
    steps = [s.strip() for s in re.split(";", solution_str) if s.strip()]  # split_steps(..., "regex", ";")
    return {"score": 0.5 * words.count("a") + 0.1 * len(words),
            "step_rewards": [float(len(s.split())) - 1.5 for s in steps]}
