"""The environment contract: text in, text out, deterministic under a reset seed, never an exception.

    env = get_env("sokoban", invalid_penalty=0.1)
    obs = env.reset(seed=3)                       # the first observation (the board)
    obs, reward, done, info = env.step("up")      # any text: unparseable text is an invalid action
    key = env.state_key()                         # canonical state (no history), the GiGPO anchor

Every environment answers:
  * ``reset(seed) -> observation``: the same seed gives the same initial state, in every process.
  * ``step(action_text) -> (observation, reward, done, info)``: the action is free text from the policy. Text
    the environment cannot parse (or a tool call it cannot run) is an *invalid action*: the state does not
    change, the observation says what was wrong and what is accepted, and the reward is ``-invalid_penalty``
    (configurable). ``info`` holds ``valid`` (bool), ``success`` (bool: the task is solved), ``tool`` (the kind
    of action: "move", "search", "answer", "invalid").
  * ``state_key() -> str``: the current state without history or turn counters, so that two rollouts of one
    seed that reach the same board produce the same key (GiGPO's anchor state; methods.md §6.1 pitfall).
  * ``instructions`` and ``answer_action(answer)``: the task statement shown once before the first observation,
    and (for question-answering environments) the action text that answers with ``answer`` (IGPO scores it).

Stepping after ``done`` is an invalid action too (observation says so, no exception).

Optional: ``expert_action() -> str``, a demonstrator's next action from the current state (``search`` has one);
`creditlab sft` then warm-starts on its whole episodes (`EnvTask.expert_turns`, `rollout.multiturn.demonstration_rows`).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple, Protocol, runtime_checkable


class StepResult(NamedTuple):
    """What ``Env.step`` returns (a tuple: ``obs, reward, done, info = env.step(a)``)."""

    observation: str
    reward: float
    done: bool
    info: dict[str, Any]


@runtime_checkable
class Env(Protocol):
    """A text environment (see the module docstring)."""

    name: str
    instructions: str

    def reset(self, seed: int) -> str: ...

    def step(self, action: str) -> StepResult: ...

    def state_key(self) -> str: ...


def state_hash(key: str) -> int:
    """A signed 64-bit hash of a state key that is the same in every process (stored in ``anchor_states``)."""
    h = int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")
    return h - (1 << 64) if h >= (1 << 63) else h


def check_penalty(invalid_penalty: float) -> float:
    if not invalid_penalty >= 0.0:
        raise ValueError(f"invalid_penalty must be >= 0, got {invalid_penalty}")
    return float(invalid_penalty)


def after_done(penalty: float) -> StepResult:
    return StepResult("The episode is over; no further actions are accepted.", -penalty, True,
                      {"valid": False, "success": False, "tool": "invalid"})
