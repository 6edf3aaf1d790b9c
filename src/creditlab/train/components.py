"""The pluggable parts of one RL step: how a batch is collected, and the stateful pieces around the estimator.

The trainer (`creditlab.train.loop.rl_step`) runs, per step:

    batch, scores = rollout.collect(policy, task, problems, cfg, seed)      # a `Rollout` (single-turn by default)
    for c in components: batch = c.produce(batch, sctx)      # fill batch fields (step scores, MC values, values ...)
    batch = produce_signals(batch, needs, sctx)              # the stateless producers keyed by field
    credit = estimator(batch)
    metrics |= ppo_update(..., components)                   # c.loss(...) terms join the policy's backward,
                                                             # c.step() after each policy optimizer step
    for c in components: metrics |= c.update(batch, sctx)    # train online parts (implicit PRM, critic, ...)
    for c in components: metrics |= c.metrics()

Checkpoints hold `{c.name: c.state_dict()}` for every component: the state must be tensors and plain Python
values only (it is read back with `torch.load(weights_only=True)`; `save_checkpoint` refuses anything else, naming
the component and key), and `load_state_dict` must restore it so that a resumed run repeats an uninterrupted one
exactly. A component with no state returns `{}`. Every component is covered by the resume-equivalence test in
`tests/reliability/test_resume_components.py`: a new one is added there by listing the options that turn it on.

Work done outside the policy's own samples (Monte-Carlo continuations, judge generations, ...) is charged to the
run through `SignalContext.count(...)`: the trainer adds `samples/extra` to its sample counter (what learning curves
are plotted against) and logs every counter.

`build_components(cfg, spec, policy, task)` asks every factory in `FACTORIES` for its component (a factory returns
None when the run does not need it); a family adds its factory there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.signals.produce import SignalContext


@runtime_checkable
class Rollout(Protocol):
    """How a step's batch is collected: G responses (or episodes) per problem, scored."""

    def collect(self, policy: Any, task: Any, problems: Sequence[Any], cfg: Any, *, seed: int
                ) -> tuple[RolloutBatch, list[Any]]:
        """(batch with rewards filled, one `Score` per row); `cfg` is the run's `RolloutConfig`."""
        ...


class SingleTurn:
    """The default rollout: `group_size` independent samples of each formatted prompt, scored by the task."""

    def collect(self, policy: Any, task: Any, problems: Sequence[Any], cfg: Any, *, seed: int
                ) -> tuple[RolloutBatch, list[Any]]:
        from creditlab.rollout.hf import SamplingConfig, generate

        sampling = SamplingConfig.from_rollout(cfg, policy.model)
        batch = generate(policy, [policy.format_prompt(p.prompt) for p in problems], cfg.group_size, sampling,
                         seed=seed)
        scores = [task.score(problems[g], text) for g, text in zip(batch.group_ids.tolist(), batch.texts)]
        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32, device=batch.response_ids.device)
        return batch.replace(rewards=rewards), scores


class Component:
    """Base class with no-op hooks; subclasses override what they need (see the module docstring)."""

    name = "component"
    wants_hidden = False  # True: ppo_update passes the policy's final hidden states [b, T, H] as outputs["hidden"]

    def produce(self, batch: RolloutBatch, ctx: SignalContext) -> RolloutBatch:
        """Fill batch fields before the estimator runs (never overwrite a field the batch already has)."""
        return batch

    def loss(self, batch: RolloutBatch, idx: Tensor, outputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """An extra loss term for the policy's backward on minibatch rows `idx` (e.g. a value head on the policy's
        trunk); `outputs` holds what the policy forward produced ("logp", "hidden" when `wants_hidden`) and the
        estimator's value targets for these rows ("returns", when it has them), and "backward_weight" (0-d: the factor
        the total is backwarded with; a component whose term is too large for one graph may backward it in pieces,
        each times this factor, and return it detached). Default: no term."""
        return torch.zeros(()), {}

    def step(self) -> None:
        """Called after each policy optimizer step: step an optimizer whose parameters got gradients from `loss`."""

    def update(self, batch: RolloutBatch, ctx: SignalContext, credit: Credit) -> dict[str, float]:
        """Train this component on the step's batch after the policy update; returns its loss metrics."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Counted events since the previous call."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume: tensors and plain Python values only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"component {self.name!r} has no state but the checkpoint holds {sorted(state)}")


class ScorerComponent(Component):
    """A step scorer (`creditlab.signals.prm`): fills step_ids/step_rewards, trains online scorers after the step."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.name = f"scorer:{scorer.name}"

    def produce(self, batch: RolloutBatch, ctx: SignalContext) -> RolloutBatch:
        from creditlab.signals.prm import produce_step_signals

        return produce_step_signals(batch, self.scorer, ctx)

    def update(self, batch: RolloutBatch, ctx: SignalContext, credit: Credit) -> dict[str, float]:
        from creditlab.signals.prm import is_online

        return self.scorer.update(batch, ctx) if is_online(self.scorer) else {}  # after the policy step (OPRL)

    def metrics(self) -> dict[str, float]:
        return self.scorer.metrics()

    def state_dict(self) -> dict[str, Any]:
        get = getattr(self.scorer, "state_dict", None)
        return get() if callable(get) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.scorer, "load_state_dict", None)
        if callable(load):
            load(state)
        else:
            super().load_state_dict(state)


def scorer_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    if not cfg.run.scorer:
        return None
    from creditlab.signals.prm import get_scorer
    from creditlab.train.checks import one_line

    try:
        return ScorerComponent(get_scorer(cfg.run.scorer, **cfg.scorer_kwargs()))
    except (TypeError, ValueError, KeyError, OSError) as e:  # a bad option value or model path
        raise ValueError(f"--scorer {cfg.run.scorer} --scorer-kwargs {cfg.run.scorer_kwargs}: {one_line(e)}") from None


def _agent_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    from creditlab.train.agent import agent_component

    return agent_component(cfg, spec, policy, task)


def mc_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    from creditlab.train.mc import build_mc_component  # Monte-Carlo values (spo_chain, vineppo); tree checks

    return build_mc_component(cfg, spec, policy, task)


def attention_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    from creditlab.train.attn_budget import attention_component as factory  # attn_waad/attn_fai (attn_*)

    return factory(cfg, spec, policy, task)


def budget_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    from creditlab.train.attn_budget import budget_component as factory  # truncate-and-answer (brpo, vsrm)

    return factory(cfg, spec, policy, task)


def critic_component(cfg: Any, spec: Any, policy: Any, task: Any) -> Component | None:
    from creditlab.train.critic import critic_component as build  # values / q_values (gae, ma_rlhf, poad, archer)

    return build(cfg, spec, policy, task)


# A factory: (TrainConfig, EstimatorSpec, Policy, Task) -> Component | None. Order is the order of `produce`
# (the agent component first: it sets step_ids = turn_ids for a step scorer on agent rows).
FACTORIES: list[Callable[[Any, Any, Any, Any], Component | None]] = [_agent_component, scorer_component, mc_component,
                                                                     attention_component, budget_component,
                                                                     critic_component]


def build_components(cfg: Any, spec: Any, policy: Any, task: Any) -> list[Component]:
    """The components this run needs, in `FACTORIES` order; names must be unique (they key the checkpoint)."""
    out = [c for c in (f(cfg, spec, policy, task) for f in FACTORIES) if c is not None]
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise ValueError(f"components with duplicate names: {names}")
    return out


def build_rollout(cfg: Any, task: Any) -> Rollout:
    """The run's rollout strategy: multi-turn episodes for environment tasks, a segment tree per prompt with
    `--rollout tree` (creditlab.rollout.tree), HBPO's budget-prefixed prompts when the estimator needs
    think_budget (creditlab.signals.budget), else single-turn sampling."""
    from creditlab.train.agent import build_agent_rollout
    from creditlab.train.attn_budget import budget_rollout

    agent = build_agent_rollout(cfg, task)
    if agent is not None:
        if cfg.mc.rollout == "tree":
            raise ValueError("--rollout tree samples single-turn responses; environment tasks roll out episodes")
        return agent
    if cfg.mc.rollout == "tree":
        from creditlab.rollout.tree import TreeRollout

        return TreeRollout.from_config(cfg.mc)
    return budget_rollout(cfg, task) or SingleTurn()
