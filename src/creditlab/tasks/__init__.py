"""Tasks: prompts for a split, and a scorer giving outcome reward and (where known) oracle step labels.

    from creditlab.tasks import get_task, list_tasks
    task = get_task("arith_chain", n_steps=2, max_operand=5)
    problems = task.problems("train", n=64, seed=0)
    score = task.score(problems[0], response_text)   # Score(reward, correct, step_labels, first_error, step_spans)

Names: ``arith_chain`` (procedural, oracle step labels), the reasoning-gym families ``chain_sum``,
``basic_arithmetic``, ``countdown``, ``gsm_symbolic`` and any other reasoning-gym dataset as ``gym:<name>``, and
``gsm8k`` (local GSM8K-format files, ``path=...``), and the environments of `creditlab.envs` (``sokoban``,
``frozenlake``, ``search``: multi-turn, rolled out by `creditlab.rollout.multiturn`). Options are keyword arguments
of the task's constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from creditlab.envs import list_envs
from creditlab.tasks.arith_chain import ArithChain
from creditlab.tasks.base import Problem, Score, Task
from creditlab.tasks.gsm8k import GSM8K
from creditlab.tasks.gym import FAMILIES, GymTask

_GYM_PREFIX = "gym:"

_TASKS: dict[str, Callable[..., Task]] = {
    "arith_chain": ArithChain,
    "gsm8k": GSM8K,
    **{family: (lambda family=family, **options: GymTask(family, **options)) for family in FAMILIES},
    **{env: (lambda env=env, **options: _env_task(env, **options)) for env in list_envs()},  # multi-turn
}


def _env_task(env: str, **options: Any) -> Task:
    from creditlab.envs.task import EnvTask  # here: envs.task imports tasks.base, which imports this package

    return EnvTask(env, **options)


def list_tasks() -> list[str]:
    """Registered task names (any reasoning-gym dataset is also available as ``gym:<name>``)."""
    return sorted(_TASKS)


def get_task(name: str, **options: Any) -> Task:
    """Build the task ``name`` with its options; an unknown name raises KeyError listing the valid names."""
    if name.startswith(_GYM_PREFIX):
        return GymTask(name[len(_GYM_PREFIX):], **options)
    if name not in _TASKS:
        raise KeyError(f"unknown task {name!r}; valid: {list_tasks()} or '{_GYM_PREFIX}<reasoning-gym dataset>'")
    return _TASKS[name](**options)


__all__ = ["GSM8K", "ArithChain", "GymTask", "Problem", "Score", "Task", "get_task", "list_tasks"]
