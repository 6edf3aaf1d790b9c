"""Multi-turn environments in TRL: creditlab's environments and multi-turn engine as a GRPOTrainer `rollout_func`.

    from creditlab.integrations.trl import CreditGRPOTrainer
    from creditlab.integrations.trl_agents import EnvRollout

    env = EnvRollout("sokoban", max_turns=6, action_tokens=16)
    trainer = CreditGRPOTrainer(model=..., processing_class=..., args=GRPOConfig(...),
                                train_dataset=env.dataset(256), reward_funcs=env.reward, rollout_func=env,
                                estimator="gigpo", row_fields=env.row_fields("gigpo"))

Each call plays one episode per prompt TRL hands over (its process's share of the generation batch: TRL repeats
each prompt `num_generations` times, and the repeats are G episodes from the same reset seed) with the trainer's
current model: `creditlab.rollout.multiturn` (KV cache kept across turns, observations in the policy's chat format).
It returns what TRL's `rollout_func` contract asks for, `prompt_ids`, `completion_ids` (actions and observations),
`logprobs` (the sampler's, 0 on observation tokens), plus `env_mask` (1 on action tokens, 0 on observation tokens:
TRL's loss skips them and CreditGRPOTrainer takes its turns from the runs of 1s) and per-row extra keys TRL hands
to reward functions: `episode_return` (the sum of turn rewards, what `EnvRollout.reward` returns), `success`,
`turn_rewards` and `anchor_states` (one value per turn: GiGPO's inputs), `strata` (Stratified GRPO: calls of the
environment's tool per episode, capped at `max_stratum`; turns for environments without tools).

The prompts must be ones `dataset()` made (the problem, hence the reset seed, is looked up by the prompt text);
an unknown prompt is a one-line error. Sampling: the trainer's temperature and top_p, `action_tokens` per turn,
seeded per call by (seed, global step, process, call count). With `answer_probs=True` (IGPO; question-answering
environments such as search) it also returns `answer_probs`: the policy's probability of each problem's gold answer
before every turn (`creditlab.signals.info_gain.answer_probs`, one teacher-forced forward per turn, as the creditlab
trainer computes it).
"""

from __future__ import annotations

from typing import Any

from creditlab.rollout.hf import SamplingConfig
from creditlab.rollout.multiturn import EpisodeScore, MultiTurn
from creditlab.tasks import get_task

__all__ = ["EnvRollout"]

# RolloutBatch field -> the key of the rollout_func output that carries it (CreditGRPOTrainer's row_fields)
_ROW_KEYS = {"turn_rewards": "turn_rewards", "anchor_states": "anchor_states", "strata": "strata",
             "answer_probs": "answer_probs"}


class EnvRollout:
    """A TRL `rollout_func` over a creditlab environment task (sokoban, frozenlake, search); see the module doc."""

    def __init__(self, task: str | Any, *, task_kwargs: dict[str, Any] | None = None, max_turns: int = 6,
                 action_tokens: int = 16, invalid_penalty: float | None = None, kv_reuse: bool = True,
                 max_stratum: int = 4, answer_probs: bool = False, seed: int = 0) -> None:
        self.task = get_task(task, **(task_kwargs or {})) if isinstance(task, str) else task
        if not hasattr(self.task, "make_env"):
            raise ValueError(f"EnvRollout needs an environment task (sokoban, frozenlake, search, ...), got "
                             f"{getattr(self.task, 'name', task)!r}")
        if action_tokens < 1 or max_stratum < 0:
            raise ValueError(f"EnvRollout needs action_tokens >= 1 and max_stratum >= 0, got {action_tokens}, "
                             f"{max_stratum}")
        self.template = getattr(self.task.make_env(), "answer_template", None) if answer_probs else None
        if answer_probs and self.template is None:
            raise ValueError(f"answer_probs=True needs a question-answering environment (one with an "
                             f"answer_template, e.g. search); {getattr(self.task, 'name', task)!r} has none")
        self.answer_probs = answer_probs
        self.engine = MultiTurn(max_turns=max_turns, invalid_penalty=invalid_penalty, kv_reuse=kv_reuse)
        self.action_tokens, self.max_stratum, self.seed = action_tokens, max_stratum, seed
        self._problems: dict[str, Any] = {}
        self._calls = 0
        self.last: tuple[Any, list[EpisodeScore]] | None = None  # the latest (RolloutBatch, scores), to inspect

    def dataset(self, n: int, *, split: str = "train", seed: int = 0) -> Any:
        """A `datasets.Dataset` with a "prompt" column: `n` problems of the task's `split`."""
        from datasets import Dataset

        problems = self.task.problems(split, n, seed)
        for p in problems:
            self._problems.setdefault(p.prompt, p)
        return Dataset.from_dict({"prompt": [p.prompt for p in problems]})

    def row_fields(self, estimator: str) -> dict[str, str]:
        """CreditGRPOTrainer's `row_fields` for `estimator`: the per-turn and per-row keys this rollout returns."""
        from creditlab.registry import get_spec

        needs = get_spec(estimator).needs
        if "answer_probs" in needs and not self.answer_probs:
            raise ValueError(f"estimator {estimator!r} needs answer_probs: build EnvRollout(..., answer_probs=True)")
        return {f: key for f, key in _ROW_KEYS.items() if f in needs}

    @staticmethod
    def reward(prompts: list[Any], completions: list[Any], episode_return: list[float], **_: Any) -> list[float]:
        """A TRL reward function: the episode's return (sum of the environment's turn rewards)."""
        return [float(r) for r in episode_return]

    def __call__(self, prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        from creditlab.policy import Policy
        from creditlab.signals.info_gain import answer_probs
        from creditlab.signals.strata import strata_by_tool_calls

        unknown = [p for p in prompts if not isinstance(p, str) or p not in self._problems]
        if unknown:
            raise ValueError(f"EnvRollout got a prompt it did not make ({str(unknown[0])[:60]!r}); build the "
                             "train/eval datasets with EnvRollout.dataset(...)")
        distinct = list(dict.fromkeys(prompts))
        expand = [distinct.index(p) for p in prompts]
        model = trainer.accelerator.unwrap_model(trainer.model)
        policy = Policy(model=model, tokenizer=trainer.processing_class, name="trl")
        sampling = SamplingConfig(temperature=float(trainer.temperature), top_p=float(trainer.top_p or 1.0),
                                  max_new_tokens=self.action_tokens)
        rank = int(trainer.accelerator.process_index)
        seed = (self.seed * 1_000_003 + int(trainer.state.global_step) * 1_009 + rank * 101 + self._calls) % 2**31
        self._calls += 1
        batch, scores = self.engine.run_rows(policy, self.task, [self._problems[p] for p in distinct], expand,
                                             sampling, seed=seed)
        probs = None
        if self.answer_probs:
            answers = [self._problems[distinct[g]].answer for g in expand]
            probs, _ = answer_probs(policy, batch, answers, template=self.template, temperature=sampling.temperature)
            batch = batch.replace(answer_probs=probs)
        self.last = (batch, scores)
        strata = strata_by_tool_calls(scores, getattr(self.task.make_env(), "stratum_tool", None),
                                      max_stratum=self.max_stratum).tolist()  # as the creditlab trainer's
        out: dict[str, list[Any]] = {k: [] for k in ("prompt_ids", "completion_ids", "logprobs", "env_mask",
                                                     "episode_return", "success", "turn_rewards", "anchor_states",
                                                     "strata")}
        for b, score in enumerate(scores):
            n = int(batch.response_mask[b].nonzero().max()) + 1 if bool(batch.response_mask[b].any()) else 0
            k = score.turns
            out["prompt_ids"].append(batch.prompt_ids[b][batch.prompt_mask[b]].tolist())
            out["completion_ids"].append(batch.response_ids[b, :n].tolist())
            out["logprobs"].append(batch.logprobs[b, :n].tolist())
            out["env_mask"].append(batch.response_mask[b, :n].int().tolist())
            out["episode_return"].append(float(score.reward))
            out["success"].append(bool(score.correct))
            out["turn_rewards"].append(batch.turn_rewards[b, :k].tolist())
            out["anchor_states"].append(batch.anchor_states[b, :k].tolist())
            out["strata"].append(int(strata[b]))
            if probs is not None:
                out.setdefault("answer_probs", []).append(probs[b, :k].tolist())
        return out
