"""The trainer's agent plumbing: the multi-turn rollout for environment tasks, and one component that fills the
agent fields an estimator needs and logs how the episodes went.

`build_agent_rollout(cfg, task)` returns a `MultiTurn` rollout for an environment task (None otherwise).
`agent_component(cfg, spec, policy, task)` (a factory in `train.components.FACTORIES`, first in order) builds an
`AgentComponent` for environment tasks. Its ``produce``:
  * ``strata`` (Stratified GRPO): the environment's tool calls per episode (`signals.strata.strata_by_tool_calls`,
    the search task's ``search`` calls), capped at ``--agent-max-stratum``;
  * ``answer_probs`` (IGPO): one teacher-forced forward per turn (`signals.info_gain`), charged as ``tokens/extra``;
  * ``step_ids = turn_ids`` when a step scorer runs (``--scorer``): on agent rows a step is a turn, so turn-level
    OPRL (``oprl_turn``) trains and reads the implicit PRM on turns (methods.md §6.4: "one row per agent step");
and records ``agent/*`` metrics (turns, invalid actions, success, tool calls, anchor-state repetition).
On a single-turn task the turn fields come from `signals.turns` through the ordinary producers (a response is a
one-turn episode), so the agent estimators run, and reduce, on any task; this component is for environment tasks.
It holds no state (environments are rebuilt from each problem's seed every step), so resume needs nothing.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from creditlab.batch import RolloutBatch
from creditlab.signals.produce import SignalContext
from creditlab.train.components import Component


def is_env_task(task: Any) -> bool:
    return bool(getattr(task, "is_env", False))


def build_agent_rollout(cfg: Any, task: Any) -> Any:
    if not is_env_task(task):
        return None
    from creditlab.rollout.multiturn import MultiTurn

    a = cfg.agent
    a.validate()
    return MultiTurn(max_turns=a.agent_max_turns, invalid_penalty=a.agent_invalid_penalty, kv_reuse=a.agent_kv_reuse)


def anchor_repeats(batch: RolloutBatch) -> dict[str, float]:
    """How often anchor states repeat inside a group: the share of turns whose (group, state) occurs >= 2 times in
    the batch (GiGPO's step-group hit rate) and the mean size of the step group a turn falls in."""
    if batch.turn_ids is None or batch.anchor_states is None:
        return {}
    n_turns = (batch.turn_ids.max(1).values + 1).clamp_min(0).tolist()
    keys = [(int(batch.group_ids[b]), int(batch.anchor_states[b, n]))
            for b in range(batch.B) for n in range(n_turns[b])]
    if not keys:
        return {}
    sizes = Counter(keys)
    per_turn = [sizes[k] for k in keys]
    return {"agent/anchor_repeat_frac": sum(s >= 2 for s in per_turn) / len(per_turn),
            "agent/anchor_group_size": sum(per_turn) / len(per_turn)}


class AgentComponent(Component):
    name = "agent"

    def __init__(self, needs: tuple[str, ...], *, max_stratum: int, chunk: int, turn_steps: bool) -> None:
        self.needs, self.max_stratum, self.chunk, self.turn_steps = needs, max_stratum, chunk, turn_steps
        self._metrics: dict[str, float] = {}

    def produce(self, batch: RolloutBatch, ctx: SignalContext) -> RolloutBatch:
        from creditlab.signals.strata import strata_by_tool_calls

        scores = list(ctx.scores)
        env = ctx.task.make_env()
        if "strata" in self.needs and batch.strata is None:
            strata = strata_by_tool_calls(scores, getattr(env, "stratum_tool", None), max_stratum=self.max_stratum)
            batch = batch.replace(strata=strata.to(batch.response_ids.device))
        if "answer_probs" in self.needs and batch.answer_probs is None:
            template = getattr(env, "answer_template", None)
            if template is None:
                raise ValueError(f"igpo needs a question-answering environment (one with an answer_template); "
                                 f"{ctx.task.name!r} has none")
            batch = self._answer_probs(batch, ctx, template)
        if self.turn_steps and batch.step_ids is None:
            batch = batch.replace(step_ids=batch.turn_ids)
        self._metrics = self._episode_metrics(batch, scores)
        return batch

    def _answer_probs(self, batch: RolloutBatch, ctx: SignalContext, template: str) -> RolloutBatch:
        from creditlab.signals.info_gain import answer_probs

        answers = [ctx.problems[g].answer for g in batch.group_ids.tolist()]
        temperature = ctx.cfg.rollout.temperature if ctx.cfg is not None else 1.0
        probs, n_tokens = answer_probs(ctx.policy, batch, answers, template=template, temperature=temperature,
                                       chunk=self.chunk)
        ctx.count("tokens/extra", n_tokens)
        return batch.replace(answer_probs=probs)

    @staticmethod
    def _episode_metrics(batch: RolloutBatch, scores: list[Any]) -> dict[str, float]:
        n = max(len(scores), 1)
        tools = Counter()
        for s in scores:
            tools.update(dict(getattr(s, "tool_calls", ())))
        out = {"agent/turns": sum(getattr(s, "turns", 0) for s in scores) / n,
               "agent/invalid_per_episode": sum(getattr(s, "invalid", 0) for s in scores) / n,
               "agent/success": sum(bool(s.correct) for s in scores) / n,
               **{f"agent/calls_{k}": v / n for k, v in tools.items()}, **anchor_repeats(batch)}
        if batch.turn_rewards is not None:
            out["agent/turn_reward_mean"] = float(batch.turn_rewards.sum() / torch.clamp(
                (batch.turn_ids.max(1).values + 1).clamp_min(0).sum(), min=1))
        return out

    def metrics(self) -> dict[str, float]:
        out, self._metrics = self._metrics, {}
        return out


def agent_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    if not is_env_task(task):
        return None
    a = cfg.agent
    return AgentComponent(tuple(spec.needs), max_stratum=a.agent_max_stratum, chunk=a.agent_info_gain_chunk,
                          turn_steps=bool(cfg.run.scorer))
