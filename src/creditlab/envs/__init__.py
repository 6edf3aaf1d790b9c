"""Text environments for multi-turn agents: a registry like the tasks' (``creditlab list`` shows them).

    from creditlab.envs import get_env, list_envs
    env = get_env("sokoban", invalid_penalty=0.1)
    obs = env.reset(seed=0); obs, reward, done, info = env.step("left")

Names: ``sokoban`` and ``frozenlake`` (grid puzzles whose states repeat across rollouts of one seed: GiGPO's
anchor states), ``search`` (multi-hop questions over a generated knowledge base with a BM25 ``search`` tool:
Stratified GRPO's strata, IGPO's answer). Each is also a task of the same name (`creditlab.envs.task.EnvTask`),
which the trainer rolls out with `creditlab.rollout.multiturn.MultiTurn`. The contract is in `envs/base.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from creditlab.envs.base import Env, StepResult, state_hash
from creditlab.envs.grid import FrozenLake, Sokoban
from creditlab.envs.search import SearchQA

_ENVS: dict[str, Callable[..., Env]] = {}


def register_env(name: str, factory: Callable[..., Env]) -> None:
    """Register an environment factory under ``name``; a duplicate name raises ValueError."""
    if name in _ENVS:
        raise ValueError(f"an environment named {name!r} is already registered; registered: {list_envs()}")
    _ENVS[name] = factory


def list_envs() -> list[str]:
    return sorted(_ENVS)


def get_env(name: str, **options: Any) -> Env:
    """Build environment ``name`` with its options; an unknown name raises KeyError listing the valid names."""
    if name not in _ENVS:
        raise KeyError(f"unknown environment {name!r}; valid: {list_envs()}")
    return _ENVS[name](**options)


for _cls in (Sokoban, FrozenLake, SearchQA):
    register_env(_cls.name, _cls)

__all__ = ["Env", "StepResult", "get_env", "list_envs", "register_env", "state_hash"]
