"""The creditlab trainer hook for verl: the fields verl does not pass to advantage estimators, checked at start.

Configuration (all under `algorithm`, next to `adv_estimator`):

    +algorithm.creditlab_kwargs={td_coef: 0.5}                      # the estimator's hyperparameters
    +algorithm.creditlab_steps={split: newline, rewards_key: step_rewards, labels_key: step_labels}
    +algorithm.creditlab_row_fields={strata: n_search_calls}        # per-row ints from the reward's extra info
    +algorithm.creditlab_row_fields={turn_rewards: turn_rewards, anchor_states: states}  # per-turn lists
    +algorithm.creditlab_planning_grams=[...]                       # HICRA's strategic grams (default: curated)

Step signals follow verl's idiom for extra reward outputs: the custom reward function returns a dict,
`{"score": R, "step_rewards": [one score per step]}` (and/or `"step_labels": [True/False/None per step]`); verl
keeps the extra keys as the row's `reward_extra_info`. The hook splits each response into steps with the same
rule the reward function used (`creditlab.signals.steps.split_steps(solution_str, "newline")`), maps them onto
the response tokens (`step_ids`) and pads the per-step values to [B,S]. A count that does not match is an error
naming the row.

What the hook reads (v1 trainer, from TransferQueue; legacy trainers, from the DataProto):
    response_ids <- responses     logprobs <- old_log_probs     ref_logprobs <- ref_log_prob
    values <- values              entropies <- entropy (v1) / entropys (legacy)
    prompt_ids, prompt_mask <- prompts (left-padded)
    step_ids, step_rewards, step_labels, strata/traj_ids/anchor_obs <- responses + reward_extra_info
    turn_ids <- the runs of 1s in response_mask (verl's agent loop sets 0 on tool responses: the turns)
    turn_rewards/anchor_states/answer_probs <- one list per response (a value per turn) under the key
        +algorithm.creditlab_row_fields names, from reward_extra_info or the agent loop's extra_fields
    planning_mask, texts <- responses decoded with the trainer's tokenizer
`check_config` runs when the `creditlab_sync` trainer is constructed, before workers, models or data load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import FIELDS
from creditlab.integrations._checks import check_estimator_kwargs
from creditlab.integrations._signals import (
    ROW_FIELDS,
    TURN_FIELDS,
    planning_mask,
    segment,
    step_labels,
    step_scores,
    turn_ids_from_mask,
    turn_values,
)
from creditlab.registry import get_spec, list_estimators
from creditlab.signals.steps import Segmenter

__all__ = ["ALWAYS", "HOOK_MADE", "V1_FIELDS", "HookConfig", "check_config", "estimator_kwargs",
           "signal_fields", "unmet_need"]

PREFIX = "creditlab_"
ALWAYS = ("response_mask", "group_ids", "rewards", "token_rewards")  # built from what verl passes estimators
# RolloutBatch field <- TransferQueue field of verl's v1 trainer.
V1_FIELDS: dict[str, str] = {"response_ids": "responses", "logprobs": "old_log_probs",
                             "ref_logprobs": "ref_log_prob", "values": "values", "entropies": "entropy"}
HOOK_MADE = ("step_ids", "step_rewards", "step_labels", "planning_mask", "texts", "prompt_ids", "prompt_mask",
             "turn_ids", *ROW_FIELDS, *TURN_FIELDS)  # made by the hook from responses, prompts and extra info
# Always available to the hook: verl computes these in every PPO step (or they come from the responses).
_FREE = {*ALWAYS, "response_ids", "logprobs", "entropies", "step_ids", "planning_mask", "texts", "prompt_ids",
         "prompt_mask", "turn_ids"}


@dataclass
class HookConfig:
    """`algorithm.creditlab_*` settings of the hook (see the module docstring)."""

    split: str = "newline"
    pattern: str | None = None
    rewards_key: str | None = None
    labels_key: str | None = None
    row_fields: dict[str, str] = field(default_factory=dict)
    planning_grams: list[str] | None = None

    @classmethod
    def from_algorithm(cls, algorithm: Any) -> HookConfig:
        steps = _plain(_get(algorithm, "creditlab_steps")) or {}
        unknown = sorted(set(steps) - {"split", "pattern", "rewards_key", "labels_key"})
        if unknown:
            raise ValueError(f"+algorithm.creditlab_steps has unknown key(s) {unknown}; valid: split, pattern, "
                             "rewards_key, labels_key")
        rows = _plain(_get(algorithm, "creditlab_row_fields")) or {}
        bad = sorted(set(rows) - set(ROW_FIELDS) - set(TURN_FIELDS))
        if bad:
            raise ValueError(f"+algorithm.creditlab_row_fields keys must be in {list(ROW_FIELDS + TURN_FIELDS)}, "
                             f"got {bad}")
        grams = _plain(_get(algorithm, "creditlab_planning_grams"))
        out = cls(split=steps.get("split", "newline"), pattern=steps.get("pattern"),
                  rewards_key=steps.get("rewards_key"), labels_key=steps.get("labels_key"),
                  row_fields={k: str(v) for k, v in rows.items()}, planning_grams=list(grams) if grams else None)
        out.segmenter()  # fail now on a bad split mode or pattern
        return out

    def segmenter(self) -> Segmenter:
        try:
            return Segmenter(self.split, self.pattern)
        except ValueError as e:
            raise ValueError(f"+algorithm.creditlab_steps: {e}") from None


def _get(config: Any, key: str) -> Any:
    return config.get(key, None) if config is not None and hasattr(config, "get") else None


def _plain(value: Any) -> Any:
    try:  # an omegaconf container
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf comes with verl
        pass
    return value


def estimator_kwargs(algorithm: Any) -> dict[str, Any]:
    """`algorithm.creditlab_kwargs` as a plain dict ({} when unset)."""
    kwargs = _plain(_get(algorithm, "creditlab_kwargs"))
    return dict(kwargs or {})


def unmet_need(name: str, config: Any, hook: HookConfig) -> str | None:
    """Why the hook cannot supply RolloutBatch field `name` under `config`, or None when it can."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    doc = f"RolloutBatch.{name} ({FIELDS[name].doc})"
    if name in _FREE:
        return None
    if name == "ref_logprobs":
        return None if need_reference_policy(config) else (
            f"{doc} needs verl's reference policy: set actor_rollout_ref.actor.use_kl_loss=True "
            "(or algorithm.use_kl_in_reward=True)")
    if name == "values":
        return None if need_critic(config) else f"{doc} needs verl's critic: set critic.enable=True"
    if name in ("step_rewards", "step_labels"):
        key = hook.rewards_key if name == "step_rewards" else hook.labels_key
        example = "[one score per step]" if name == "step_rewards" else "[True/False/None per step]"
        return None if key else (
            f"{doc}: have the reward function return {{'score': R, '{name}': {example}}} and set "
            f"+algorithm.creditlab_steps={{split: newline, {name[5:]}_key: {name}}}")
    if name in ROW_FIELDS:
        return None if name in hook.row_fields else (
            f"{doc}: have the reward function return {{'score': R, '<key>': int}} and set "
            f"+algorithm.creditlab_row_fields={{{name}: <key>}}")
    if name in TURN_FIELDS:
        return None if name in hook.row_fields else (
            f"{doc}: have the agent loop (AgentLoopOutput.extra_fields) or the reward function give each response "
            f"'<key>': [one value per turn] (turns: the runs of 1s in verl's response_mask between tool responses) "
            f"and set +algorithm.creditlab_row_fields={{{name}: <key>}}")
    return (f"{doc} cannot be produced by creditlab's verl hook; hand it to the estimator from a custom trainer "
            f"with creditlab.integrations.verl.batch_fields({name}=...)")


def check_config(config: Any) -> str | None:
    """At trainer start: the creditlab estimator named by `algorithm.adv_estimator` exists, its kwargs fit and
    every field it needs can be supplied. Raises one `ValueError` listing every problem; returns the estimator
    name (None when `adv_estimator` is not a creditlab one)."""
    adv = str(config.algorithm.adv_estimator)
    if not adv.startswith(PREFIX):
        return None
    name = adv[len(PREFIX):]
    if name not in list_estimators():
        raise ValueError(f"algorithm.adv_estimator={adv}: no creditlab estimator {name!r}; registered: "
                         f"{[PREFIX + n for n in list_estimators()]}")
    check_estimator_kwargs(name, estimator_kwargs(config.algorithm), option="+algorithm.creditlab_kwargs")
    hook = HookConfig.from_algorithm(config.algorithm)
    problems = [p for p in (unmet_need(f, config, hook) for f in get_spec(name).needs) if p]
    if problems:
        raise ValueError(f"algorithm.adv_estimator={adv} cannot run: " + "; ".join(problems))
    return name


def signal_fields(names: set[str], response_ids: Tensor, response_mask: Tensor, tokenizer: Any, hook: HookConfig,
                  infos: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The hook-made fields in `names` from responses [B,T] and each row's reward_extra_info (`infos`)."""
    out: dict[str, Any] = {}
    mask = response_mask.bool()
    if names & {"step_ids", "step_rewards", "step_labels"}:
        seg = segment(response_ids, mask, tokenizer, hook.segmenter())
        out["step_ids"] = seg.step_ids
        for name, key, make in (("step_rewards", hook.rewards_key, step_scores),
                                ("step_labels", hook.labels_key, step_labels)):
            if name in names:
                values = [_info(infos, b, key, name) for b in range(len(mask))]
                out[name] = make(values, seg, source=f"reward_extra_info[{key!r}] (split {hook.split!r})",
                                 where="response")
    if "planning_mask" in names:
        out["planning_mask"] = planning_mask(response_ids, mask, tokenizer, hook.planning_grams)
    if "texts" in names:
        out["texts"] = [tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
                        for ids, m in zip(response_ids.cpu(), mask.cpu())]
    for name in names & set(ROW_FIELDS):
        key = hook.row_fields[name]
        out[name] = torch.tensor([int(_info(infos, b, key, name)) for b in range(len(mask))],
                                 dtype=torch.long, device=response_ids.device)  # [B]
    if names & {"turn_ids", *TURN_FIELDS}:  # multi-turn: verl's agent loop zeros tool responses in response_mask
        turns = turn_ids_from_mask(mask)
        if "turn_ids" in names:
            out["turn_ids"] = turns
        for name in sorted(names & set(TURN_FIELDS)):
            key = hook.row_fields[name]
            out[name] = turn_values(name, [_info(infos, b, key, name) for b in range(len(mask))], turns,
                                    source=f"extra info {key!r}", where="response")
    return out


def _info(infos: list[dict[str, Any]] | None, b: int, key: str, name: str) -> Any:
    row = (infos or [])[b] if infos and b < len(infos) else {}
    if key not in row:
        raise ValueError(f"RolloutBatch.{name}: response {b} has no '{key}' in its reward_extra_info (keys: "
                         f"{sorted(row)}); the reward function must return {{'score': R, '{key}': ...}}")
    return row[key]


def left_pad(rows: list[Tensor], pad: int) -> tuple[Tensor, Tensor]:
    """Ragged 1-D rows -> ([B,P] left-padded, [B,P] bool mask)."""
    width = max([len(r) for r in rows] + [1])
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for b, r in enumerate(rows):
        if len(r):
            ids[b, width - len(r):] = r.long()
            mask[b, width - len(r):] = True
    return ids, mask
