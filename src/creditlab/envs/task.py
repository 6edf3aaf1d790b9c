"""An environment as a creditlab ``Task``: problems are reset seeds, the trainer rolls them out turn by turn.

    task = get_task("sokoban", size=6, walls=2)        # EnvTask("sokoban", ...): options go to the environment
    problems = task.problems("train", 64, seed=0)       # Problem(prompt=instructions + first observation,
                                                        #         answer=gold answer or "", meta={"env_seed": s})
    env = task.make_env(invalid_penalty=0.1); env.reset(problems[0].meta["env_seed"])

Splits are disjoint by the *level* (a stable hash of the first observation), not by the seed, so two seeds that
draw the same board never land in different splits. ``score(problem, response)`` replays a whole response
open-loop (each line that holds an action is one step): it serves single-turn rollouts and tools that score text;
the multi-turn rollout (`creditlab.rollout.multiturn`) steps the environment itself and never calls it.
"""

from __future__ import annotations

import random
from typing import Any

from creditlab.envs import get_env
from creditlab.envs.base import Env
from creditlab.tasks.base import ZERO, Problem, Score, check_split, max_draws, split_of


class EnvTask:
    """Task adapter for environment ``env_name``; ``**env_options`` go to the environment's constructor."""

    is_env = True  # the trainer picks the multi-turn rollout for these tasks (train.components.build_rollout)

    def __init__(self, env_name: str, *, test_fraction: float = 0.2, **env_options: Any) -> None:
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"need 0 < test_fraction < 1, got {test_fraction}")
        self.name, self.env_options, self.test_fraction = env_name, dict(env_options), test_fraction
        self.make_env()  # validates the options now

    def make_env(self, **overrides: Any) -> Env:
        """A fresh environment with the task's options (``overrides``, e.g. ``invalid_penalty``, win)."""
        return get_env(self.name, **{**self.env_options, **overrides})

    def problems(self, split: str, n: int, seed: int) -> list[Problem]:
        check_split(split)
        rng = random.Random(f"envtask:{self.name}:{split}:{seed}")
        env = self.make_env()
        out: list[Problem] = []
        for _ in range(max_draws(n)):
            if len(out) == n:
                break
            env_seed = rng.randrange(2**31)
            first = env.reset(env_seed)
            if split_of(f"{self.name}:{first}", self.test_fraction) != split:
                continue
            out.append(Problem(prompt=f"{env.instructions}\n{first}", answer=str(getattr(env, "answer", "")),
                               meta={"env": self.name, "env_seed": env_seed}))
        if len(out) < n:
            raise ValueError(f"{self.name}: could not draw {n} {split} problems; the level space is too small")
        return out

    def score(self, problem: Problem, response: str) -> Score:
        """Open-loop replay: each line of ``response`` that parses as an action is one step (never raises)."""
        if not isinstance(response, str):
            return ZERO
        env = self.make_env()
        env.reset(problem.meta["env_seed"])
        total, success = 0.0, False
        for line in response.splitlines():
            if not line.strip():
                continue
            _, reward, done, info = env.step(line)
            total += reward
            success = bool(info.get("success", False))
            if done:
                break
        return Score(reward=total, correct=success)

    @property
    def has_expert(self) -> bool:
        """The environment has a demonstrator (``expert_action()``): `creditlab sft` then imitates whole episodes."""
        return callable(getattr(self.make_env(), "expert_action", None))

    def expert_turns(self, problem: Problem, max_turns: int) -> list[tuple[str, str]]:
        """The demonstrator's episode on ``problem``, closed-loop: ``(action, observation)`` per turn, the last
        observation ``""`` (the rollout shows no observation after the last action). Raises if it does not
        solve the problem within ``max_turns``: a warm start never imitates a failed episode."""
        env = self.make_env()
        env.reset(problem.meta["env_seed"])
        turns: list[tuple[str, str]] = []
        for _ in range(max_turns):
            action = env.expert_action()
            obs, _, done, info = env.step(action)
            turns.append((action, obs))
            if done:
                if info.get("success"):
                    turns[-1] = (action, "")
                    return turns
                break
        raise ValueError(f"{self.name}: the demonstrator does not solve env seed {problem.meta['env_seed']} in "
                         f"{max_turns} turns (raise --max-turns)")

    def demonstration(self, problem: Problem) -> str:
        """A shortest solution, one move per line (environments that know one, e.g. sokoban)."""
        env = self.make_env()
        env.reset(problem.meta["env_seed"])
        moves = getattr(env, "solution", None)
        if not moves:
            raise NotImplementedError(f"{self.name}: this environment has no demonstrations")
        return "\n".join(moves)
