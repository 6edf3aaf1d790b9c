"""TRL integration: `CreditGRPOTrainer`, a `trl.GRPOTrainer` whose advantages come from a creditlab estimator.

    from creditlab.integrations.trl import CreditGRPOTrainer
    trainer = CreditGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                                estimator="tempo", estimator_kwargs={})

Pinned to trl==1.16.0 (`pip install "creditlab[trl]"`). TRL's loss accepts advantages of shape [B,T]; the
supported extension point is `_generate_and_score_completions`, whose output dict carries `prompt_ids`,
`prompt_mask`, `completion_ids`, `completion_mask`, `advantages` and optionally `old_per_token_logps`,
`ref_per_token_logps` and `tool_mask`. This subclass lets TRL generate and score as usual, builds this process's
`RolloutBatch` rows, gathers them over processes, runs the estimator on the whole generation batch and replaces
`advantages` with this process's rows [b, T].

Mapping (TRL -> RolloutBatch):
    completion_ids                      -> response_ids   [B,T]
    completion_mask * tool_mask         -> response_mask  [B,T] (tool-output tokens get no credit)
    row index // num_generations        -> group_ids      [B]   (TRL's RepeatSampler repeats each prompt
                                                                  num_generations times, in order)
    sum_k weight_k * reward_k           -> rewards        [B]   (TRL's `sum_then_normalize` reward)
    the same reward on the last token   -> token_rewards  [B,T]
    prompt_ids / prompt_mask            -> prompt_ids / prompt_mask [B,P]
    ref_per_token_logps (beta != 0)     -> ref_logprobs
    extra no-grad forward of the policy -> logprobs, entropies, certainty, token_logits (only when needed)
    decoded completions                 -> texts
    runs of 1s in the response_mask     -> turn_ids       [B,T] (multi-turn: below)
    the sources in `trl_sources`        -> step_ids, step_rewards, step_labels, strata, planning_mask,
                                           prm_logprobs, values, ... (see `FIELD_HOW`)

Multi-turn agents (gigpo, mt_grpo, igpo, oprl_turn, poad_turns, archer, stratified): TRL's own tool loop
(`tools=` / `environment_factories=`) or a `rollout_func` returning `env_mask` (1 on model tokens, 0 on
environment/tool tokens) gives completions whose masked runs are the turns; `turn_ids` follow from them. Per-turn
fields come from extra keys of the rollout_func output (TRL hands them to reward functions, so they reach the
trainer as columns): `row_fields={"turn_rewards": "turn_rewards", "anchor_states": "states"}` with one list per
completion and one value per turn (anchor states as ints or state strings), `row_fields={"strata": "n_calls"}`
per completion. tests/integrations/test_trl_multiturn.py runs a real multi-turn environment this way.

Semantics kept from TRL: a completion every reward function scored None (NaN) is *unscorable*: it gets advantage
0 and the estimator runs without it (it is in no group statistic, no prefix tree, no batch whitening). An
infinite reward is refused with an error naming the reward function and the completion (stock TRL silently
zeroes that completion's whole group). `scale_rewards` is honoured where the estimator has the matching option
and refused otherwise (`scale_rewards_kwargs`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor
from trl import GRPOTrainer

from creditlab.batch import FIELDS, REQUIRED, RolloutBatch
from creditlab.integrations._checks import check_estimator_kwargs
from creditlab.integrations.trl_sources import (
    ROW_FIELDS,
    TURN_FIELDS,
    LocalRows,
    StepSource,
    implicit_prm_fields,
    planning_fields,
    row_field_values,
    turn_ids_from_mask,
)
from creditlab.registry import get_spec

__all__ = ["FIELD_HOW", "FIELD_SOURCES", "CreditGRPOTrainer", "make_implicit_prm", "plan_fields", "plan_sources",
           "scale_rewards_kwargs", "unsupported_fields"]

# Optional RolloutBatch fields this trainer fills from TRL's own output, and from what.
FIELD_SOURCES: dict[str, str] = {
    "prompt_ids": "TRL's prompt_ids",
    "prompt_mask": "TRL's prompt_mask",
    "ref_logprobs": "TRL's ref_per_token_logps (needs beta != 0)",
    "logprobs": "TRL's old_per_token_logps, else one extra no-grad forward of the policy",
    "entropies": "one extra no-grad forward of the policy (logits / temperature)",
    "certainty": "one extra no-grad forward of the policy (raw logits)",
    "token_logits": "one extra no-grad forward of the policy (raw logits)",
    "texts": "the tokenizer's decode of completion_ids",
    "token_rewards": "the summed reward on each completion's last valid token",
    "step_ids": "the step splitter (step_split=, default 'newline') on the decoded completions",
    "planning_mask": "creditlab's strategic-gram detector on the completions (planning_grams=)",
    "turn_ids": "the runs of model tokens between tool/environment tokens (TRL's tool_mask, or the env_mask a "
                "multi-turn rollout_func returns); a completion without such tokens is one turn",
}
# How a user supplies the fields TRL's output does not hold (named in construction errors).
FIELD_HOW: dict[str, str] = {
    "step_rewards": "step_reward_funcs=[fn], fn(prompts, completions, steps, completion_ids, **columns) -> one "
                    "list of per-step scores per completion (steps: each completion's step texts under "
                    "step_split=), or implicit_prm=... (its step rewards)",
    "step_labels": "step_label_func=fn, called like a step reward function, returning True/False/None per step",
    "prm_logprobs": "implicit_prm={'mode': 'prime'} (or 'oprl', or an ImplicitPRMScorer): a second copy of the "
                    "policy trained online as an implicit PRM",
    "values": "field_producers={'values': fn}, fn(batch: RolloutBatch) -> [b,T] values from a critic of your own "
              "(TRL's GRPOTrainer trains no value model)",
    **{f: f"row_fields={{'{f}': 'a dataset column'}} or row_fields={{'{f}': fn}}, fn(prompts, completions, "
          f"completion_ids, **columns) -> one int per completion" for f in ROW_FIELDS},
    **{f: f"row_fields={{'{f}': 'a key of your rollout_func output (or a dataset column)'}} or row_fields="
          f"{{'{f}': fn}}, called like a reward function -> one list per completion with one value per turn "
          "(turns: the runs of model tokens between the env_mask/tool_mask zeros)" for f in TURN_FIELDS},
}
_FORWARD_FIELDS = ("logprobs", "entropies", "certainty", "token_logits")
_PAD = {"step_ids": -1, "turn_ids": -1, "step_labels": -1, "mc_cuts": -1}  # padding of [B,T]/[B,S]/[B,C] fields


def unsupported_fields(needs: tuple[str, ...]) -> list[str]:
    """Fields in `needs` that TRL's generation output alone cannot give (they need a source, see `FIELD_HOW`)."""
    return [f for f in needs if f not in REQUIRED and f not in FIELD_SOURCES]


def plan_fields(estimator: str, needs: Sequence[str], *, step_rewards: bool, step_labels: bool,
                row_fields: Sequence[str], implicit_prm: Any, producers: Sequence[str]) -> dict[str, str]:
    """Where each needed optional field comes from ({field: source}); a `ValueError` says how to supply the rest.

    `implicit_prm` is the `ImplicitPRMScorer` (or None). With reference="frozen" (PRIME) it also gives
    `ref_logprobs`, its frozen reference's; with reference="old_policy" (OPRL) it divides by `logprobs`.
    """
    plan, missing = {}, []
    if implicit_prm is not None and implicit_prm.reference == "old_policy":
        plan["logprobs"] = "trl"  # the PRM's denominator: the rollout policy's log-probs
        if "ref_logprobs" in needs and "prm_logprobs" in needs:
            raise ValueError(f"estimator {estimator!r} divides by the implicit PRM's frozen reference "
                             "(ref_logprobs): use implicit_prm with reference='frozen'")
    for f in needs:
        if f in REQUIRED or f in plan:
            continue
        if f in producers:
            plan[f] = "producer"
        elif implicit_prm is not None and (f == "prm_logprobs" or (f == "ref_logprobs" and "prm_logprobs" in needs)):
            plan[f] = "implicit_prm"  # PRIME: q = log pi_phi - log pi_ref with the PRM's own frozen reference
        elif f == "step_rewards" and (step_rewards or implicit_prm is not None):
            plan[f] = "steps" if step_rewards else "implicit_prm"
        elif (f == "step_labels" and step_labels) or f == "step_ids":
            plan[f] = "steps"
        elif f in row_fields:
            plan[f] = "row_fields"
        elif f == "planning_mask":
            plan[f] = "planning"
        elif f in FIELD_SOURCES:
            plan[f] = "trl"
        else:
            missing.append(f)
    if missing:
        how = "; ".join(f"RolloutBatch.{f} ({FIELDS[f].doc}): pass "
                        + FIELD_HOW.get(f, f"field_producers={{'{f}': fn}}, fn(batch: RolloutBatch) -> the field "
                                           "for this process's rows") for f in missing)
        raise ValueError(f"estimator {estimator!r} needs fields TRL's generation output does not hold. {how}")
    return plan


def plan_sources(estimator: str, needs: Sequence[str], *, step_reward_funcs: list, step_label_func: Any,
                 planning_grams: Any, row_fields: dict[str, Any], implicit_prm: Any,
                 field_producers: dict[str, Any]) -> dict[str, str]:
    """`plan_fields` for the sources a user gave; also refuses a source the estimator would not read."""
    bad_rows = sorted(set(row_fields) - set(ROW_FIELDS) - set(TURN_FIELDS))
    if bad_rows:
        raise ValueError(f"row_fields keys must be per-completion integer fields {list(ROW_FIELDS)} or per-turn "
                         f"fields {list(TURN_FIELDS)}, got {bad_rows}")
    bad_producers = sorted(set(field_producers) - set(FIELDS))
    if bad_producers:
        raise ValueError(f"field_producers keys must be RolloutBatch fields, got {bad_producers}")
    plan = plan_fields(estimator, needs, step_rewards=bool(step_reward_funcs), step_labels=step_label_func
                       is not None, row_fields=list(row_fields), implicit_prm=implicit_prm,
                       producers=list(field_producers))
    given = {"step_reward_funcs": ("step_rewards", "steps") if step_reward_funcs else None,
             "step_label_func": ("step_labels", "steps") if step_label_func is not None else None,
             "planning_grams": ("planning_mask", "planning") if planning_grams is not None else None,
             **{f"row_fields[{f!r}]": (f, "row_fields") for f in row_fields},
             **{f"field_producers[{f!r}]": (f, "producer") for f in field_producers}}
    unused = [k for k, v in given.items() if v is not None and plan.get(v[0]) != v[1]]
    unused += ["implicit_prm"] if implicit_prm is not None and "implicit_prm" not in plan.values() else []
    if unused:
        raise ValueError(f"{', '.join(unused)} given, but estimator {estimator!r} does not read what it supplies "
                         f"(it needs {list(needs)})")
    return plan


def make_implicit_prm(implicit_prm: Any, estimator: str) -> Any:
    """The `ImplicitPRMScorer` for `implicit_prm=` (a scorer, or its keyword arguments; mode defaults to the
    estimator's: "prime" or "oprl"). Models are copied from the policy later, once TRL has loaded it."""
    from creditlab.signals.implicit import ImplicitPRMScorer

    if isinstance(implicit_prm, dict):
        return ImplicitPRMScorer(**{"mode": estimator if estimator in ("prime", "oprl") else "prime", **implicit_prm})
    if not isinstance(implicit_prm, ImplicitPRMScorer):
        raise ValueError(f"implicit_prm must be an ImplicitPRMScorer or its keyword arguments (a dict), got "
                         f"{type(implicit_prm).__name__}")
    return implicit_prm


def scale_rewards_kwargs(estimator: str, scale_rewards: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Estimator kwargs honouring `GRPOConfig.scale_rewards`, or a `ValueError` saying which option to use.

    "group" (TRL's default) leaves normalization to the estimator. "none" sets `scale_by_std=False` where the
    estimator has it and is accepted by `dr_grpo` (unscaled by definition). "batch" (TRL: divide by the std of
    the whole batch's rewards) has no creditlab counterpart.
    """
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale == "group":
        return kwargs
    defaults = get_spec(estimator).defaults
    if scale == "none":
        if "scale_by_std" in defaults:
            if kwargs.get("scale_by_std", False):
                raise ValueError(f"GRPOConfig(scale_rewards='none') contradicts estimator_kwargs={{'scale_by_std': "
                                 f"True}} for estimator {estimator!r}: drop one of them")
            return {**kwargs, "scale_by_std": False}
        if estimator == "dr_grpo":
            return kwargs
    alternatives = ("use estimator='grpo' (group std) or 'reinforce_pp' (group mean, then whitening over the "
                    "batch's tokens)" if scale == "batch" else
                    "for unscaled GRPO use estimator='grpo' with estimator_kwargs={'scale_by_std': False}, or "
                    "estimator='dr_grpo'")
    raise ValueError(f"GRPOConfig(scale_rewards={scale_rewards!r}) cannot be honoured by estimator {estimator!r}, "
                     f"whose normalization is part of the method (hyperparameters: {defaults}). Leave "
                     f"scale_rewards='group' (the default: the estimator decides); {alternatives}")


class CreditGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with per-token advantages [B,T] from the creditlab estimator `estimator`.

    Args (beyond GRPOTrainer's):
        estimator: name of a registered creditlab estimator (`creditlab list`).
        estimator_kwargs: its hyperparameters (checked here against its signature and on a probe batch).
            For TRL-identical GRPO advantages use `estimator="grpo", estimator_kwargs={"eps": 1e-4}`.
        step_reward_funcs, step_reward_weights, step_label_func, step_split: step signals (`trl_sources`).
        row_fields: {"strata" | "traj_ids" | "anchor_obs": dataset column name or TRL-style function}, and the
            per-turn fields {"turn_rewards" | "anchor_states" | "answer_probs": a rollout_func output key or a
            function} giving one list per completion, one value per turn (multi-turn: module docstring).
        planning_grams: strategic grams for `planning_mask` (default creditlab's curated list).
        implicit_prm: an `ImplicitPRMScorer`, or its keyword arguments as a dict (PRIME/OPRL); it starts as a
            copy of the policy, is updated once per generation batch, and is saved in TRL checkpoints.
        field_producers: {field: fn(batch: RolloutBatch) -> tensor for this process's rows}, for anything else.
    Every needed field must have a source, else construction fails naming the field and how to supply it.
    """

    def __init__(self, *args: Any, estimator: str = "tempo", estimator_kwargs: dict[str, Any] | None = None,
                 step_reward_funcs: Callable[..., Any] | Sequence[Callable[..., Any]] | None = None,
                 step_reward_weights: Sequence[float] | None = None, step_label_func: Callable[..., Any] | None = None,
                 step_split: Any = "newline", row_fields: dict[str, Any] | None = None,
                 planning_grams: Sequence[str] | None = None, implicit_prm: Any = None,
                 field_producers: dict[str, Callable[[RolloutBatch], Tensor]] | None = None, **kwargs: Any) -> None:
        spec = get_spec(estimator)  # KeyError naming the registered estimators
        est_kwargs = dict(estimator_kwargs or {})
        check_estimator_kwargs(estimator, est_kwargs, option="estimator_kwargs")
        grpo_args = kwargs.get("args", args[2] if len(args) > 2 else None)
        est_kwargs = scale_rewards_kwargs(estimator, getattr(grpo_args, "scale_rewards", "group"), est_kwargs)
        aggregation = getattr(grpo_args, "multi_objective_aggregation", "sum_then_normalize")
        if aggregation != "sum_then_normalize":
            raise ValueError("CreditGRPOTrainer needs multi_objective_aggregation='sum_then_normalize' (the "
                             f"estimator sees one summed reward per completion), got {aggregation!r}")
        funcs = [step_reward_funcs] if callable(step_reward_funcs) else list(step_reward_funcs or [])
        row_fields, producers = dict(row_fields or {}), dict(field_producers or {})
        prm = make_implicit_prm(implicit_prm, estimator) if implicit_prm is not None else None
        self._plan = plan_sources(estimator, spec.needs, step_reward_funcs=funcs, step_label_func=step_label_func,
                                  planning_grams=planning_grams, row_fields=row_fields, implicit_prm=prm,
                                  field_producers=producers)
        self._steps = StepSource(step_split, funcs, step_reward_weights, step_label_func)
        self._row_fields, self._producers, self._planning_grams = row_fields, producers, planning_grams
        super().__init__(*args, **kwargs)
        if self._plan.get("ref_logprobs") == "trl" and self.beta == 0.0:
            raise ValueError(f"estimator {estimator!r} needs RolloutBatch.ref_logprobs, which TRL computes only "
                             f"with a reference model: set GRPOConfig(beta=...) > 0")
        self.estimator_name, self.estimator_kwargs = estimator, est_kwargs
        self._estimator = spec.fn
        self._prm = self._start_prm(prm) if prm is not None else None
        self._rows: LocalRows | None = None
        self._rewards_per_func: Tensor | None = None

    def _start_prm(self, prm: Any) -> Any:
        if prm.prm is None:  # starts as a copy of the policy (and, for PRIME, a frozen copy as its reference)
            prm._init_models(self.accelerator.unwrap_model(self.model))
        for model in (prm.prm, prm.ref):
            if model is None:  # OPRL's reference is the rollout policy's log-probs, not a model
                continue
            # TRL patches the policy's `forward` (a fused LM head) with a closure over the *original* model's
            # bound forward; a deep copy would keep calling the policy. The copies use their class's forward.
            vars(model).pop("forward", None)
            model.to(self.accelerator.device)
        return prm

    # ---- hooks into TRL ----
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards of every process's completions [N, F]; keep them and this process's inputs.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._check_finite(rewards_per_func, completions)
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion",
                                                                              "completion_ids")}
        self._rows = LocalRows(self._tokenizer, list(prompts), list(completions),
                               [list(map(int, c)) for c in completion_ids_list], columns,
                               self.accelerator.process_index)
        self._rewards_per_func = rewards_per_func
        return rewards_per_func

    def _check_finite(self, rewards_per_func: Tensor, completions: list[Any]) -> None:
        # Every process holds the same gathered matrix, so every process raises together (no hang).
        bad = torch.isinf(rewards_per_func).nonzero()
        if len(bad) == 0:
            return
        row, func = (int(x) for x in bad[0])
        b = len(completions)
        rank, local = divmod(row, b)
        text = f" ({completions[local]!r})" if rank == self.accelerator.process_index else ""
        raise ValueError(f"reward function {self.reward_func_names[func]!r} returned "
                         f"{float(rewards_per_func[row, func])} for completion {row} of the generation batch "
                         f"(process {rank}, row {local}){text}: rewards must be finite; return None for a "
                         "completion that cannot be scored (it then gets advantage 0, as in TRL)")

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        batch, unscorable = self._rollout_batch(output, mode)  # every process's rows
        advantages, credit, scored = self._estimate(batch, unscorable)
        b, t = output["completion_ids"].shape
        rank = self.accelerator.process_index
        rows = slice(rank * b, (rank + 1) * b)  # the same process slice TRL uses
        output["advantages"] = advantages[rows, :t].to(torch.float32).contiguous()  # [b, T_local]
        if self._prm is not None and mode == "train" and scored is not None:
            for key, value in self._prm.update(scored, self._rows.context()).items():
                self._metrics[mode][key].append(float(value))
        self._log_credit(credit, batch, advantages, mode)
        return output

    def _estimate(self, batch: RolloutBatch, unscorable: Tensor) -> tuple[Tensor, Any, RolloutBatch | None]:
        """Advantages [B,T] of the scorable rows (unscorable rows: 0, left out of the estimator's batch)."""
        if not bool(unscorable.any()):
            credit = self._estimator(batch, **self.estimator_kwargs)
            return credit.advantages, credit, batch
        keep = (~unscorable).nonzero().squeeze(1)  # [B']
        advantages = torch.zeros(batch.response_ids.shape, device=batch.response_ids.device)
        if len(keep) == 0:
            return advantages, None, None
        scored = batch.select(keep)
        credit = self._estimator(scored, **self.estimator_kwargs)
        advantages[keep] = credit.advantages.to(advantages.dtype)
        return advantages, credit, scored

    # ---- batch construction ----
    def _rollout_batch(self, output: dict[str, Any], mode: str) -> tuple[RolloutBatch, Tensor]:
        """The `RolloutBatch` of the whole generation batch (every process's rows, in TRL's order) and its
        unscorable rows [B] bool."""
        per_func = self._rewards_per_func
        if per_func is None or self._rows is None:
            raise RuntimeError("TRL did not call _calculate_rewards before scoring (unsupported TRL version?)")
        b = output["completion_ids"].shape[0]
        rank = self.accelerator.process_index
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1).float()  # [N]
        unscorable = torch.isnan(per_func).all(dim=1)  # [N], as TRL
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        index = torch.arange(b, device=rewards.device) + rank * b
        local = self._local_batch(output, rewards[index], index // num_generations)
        fields = {name: self._gather(name, getattr(local, name)) for name in FIELDS
                  if getattr(local, name) is not None and name not in ("rewards", "group_ids")}
        n = fields["response_ids"].shape[0]
        group_ids = torch.arange(n, device=fields["response_ids"].device) // num_generations  # [B]
        return RolloutBatch(group_ids=group_ids, rewards=rewards.to(group_ids.device), **fields), unscorable

    def _local_batch(self, output: dict[str, Any], rewards: Tensor, group_ids: Tensor) -> RolloutBatch:
        """This process's rows with every field the estimator needs (filled from TRL output and the sources)."""
        ids, mask = output["completion_ids"], output["completion_mask"].bool()
        if "tool_mask" in output:
            mask = mask & output["tool_mask"].bool()
        batch = RolloutBatch(response_ids=ids, response_mask=mask, group_ids=group_ids.to(ids.device),
                             rewards=rewards.to(ids.device), prompt_ids=output["prompt_ids"],
                             prompt_mask=output["prompt_mask"].bool())
        trl = {f for f, src in self._plan.items() if src == "trl"}
        found: dict[str, Any] = {}
        if "ref_logprobs" in trl:
            found["ref_logprobs"] = output["ref_per_token_logps"]
        forward = [f for f in _FORWARD_FIELDS if f in trl]
        if forward == ["logprobs"] and output.get("old_per_token_logps") is not None:
            found["logprobs"] = output["old_per_token_logps"]
        elif forward:
            found.update(self._policy_signals(output, forward))
        found = {k: torch.where(mask, v.float(), 0.0) for k, v in found.items()}  # padding: finite 0
        if "token_rewards" in trl:
            last = (mask.long() * torch.arange(1, mask.shape[1] + 1, device=mask.device)).argmax(1)  # [b]
            found["token_rewards"] = torch.zeros(mask.shape, device=mask.device).scatter(
                1, last[:, None], batch.rewards.float()[:, None]) * mask
        if "texts" in trl:
            found["texts"] = self._tokenizer.batch_decode(ids, skip_special_tokens=True)
        if "turn_ids" in trl:
            found["turn_ids"] = turn_ids_from_mask(mask)
        batch = batch.replace(**found)
        return self._run_sources(batch)

    def _run_sources(self, batch: RolloutBatch) -> RolloutBatch:
        plan, rows = self._plan, self._rows
        wanted = {f for f, src in plan.items() if src == "steps"}
        if wanted or self._prm is not None:
            batch = batch.replace(**self._steps.produce(batch, rows, wanted))
        if "planning" in plan.values():
            batch = batch.replace(**planning_fields(batch, rows, self._planning_grams))
        for name, source in self._row_fields.items():
            batch = batch.replace(**{name: row_field_values(name, source, rows, batch.response_ids.device, batch)})
        if self._prm is not None:
            made = implicit_prm_fields(self._prm, batch, rows)
            batch = batch.replace(**{k: v for k, v in made.items() if plan.get(k) == "implicit_prm"})
        for name, fn in self._producers.items():
            batch = batch.replace(**{name: fn(batch)})
        keep = set(plan) | {"response_ids", "response_mask", "group_ids", "rewards"}
        if self._prm is not None:  # its update reads the prompts and the steps of the whole batch
            keep |= {"prompt_ids", "prompt_mask", "step_ids"}
        return batch.replace(**{f: None for f in FIELDS if f not in keep})

    def _gather(self, name: str, x: Any) -> Any:
        """Pad `x` (this process's rows) to the longest over processes and gather the rows, by the field's shape.

        Booleans travel as int64: accelerate pads with `tensor.new_zeros(...) + pad_index`, which turns a bool
        into int64 on the processes that needed padding only, and gloo then fails on mismatched sizes.
        """
        spec = FIELDS[name]
        if spec.kind == "list":
            return gather_object(list(x))
        if len(spec.shape) == 1:
            return self.accelerator.gather(x)
        is_bool = x.dtype == torch.bool
        x = x.long() if is_bool else x
        left = spec.shape[1] == "P"
        pad = self._tokenizer.pad_token_id if name == "prompt_ids" else _PAD.get(name, 0)
        x = self.accelerator.pad_across_processes(x, dim=1, pad_index=pad, pad_first=left)
        x = self.accelerator.gather(x)
        return x.bool() if is_bool else x

    @torch.no_grad()
    def _policy_signals(self, output: dict[str, Any], names: list[str]) -> dict[str, Tensor]:
        """One no-grad forward of the policy over prompt+completion: per-token signals [b, T] for `names`.

        logprobs and entropies use logits / temperature (the sampling distribution, as TRL's own logprobs);
        certainty (logsumexp - mean of the logits) and token_logits use the raw logits.
        """
        if any(k in output for k in ("pixel_values", "image_grid_thw", "num_images")):
            raise NotImplementedError(f"estimator {self.estimator_name!r} needs policy signals {names}; "
                                      "CreditGRPOTrainer computes them for text-only models")
        completion_ids = output["completion_ids"]
        input_ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)  # [b, P+T]
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        t = completion_ids.shape[1]
        chunk = self.args.per_device_train_batch_size
        parts: dict[str, list[Tensor]] = {n: [] for n in names}
        for start in range(0, input_ids.shape[0], chunk):
            ids = input_ids[start:start + chunk]
            logits = self.model(input_ids=ids, attention_mask=attention_mask[start:start + chunk],
                                logits_to_keep=t + 1).logits[:, :-1].float()  # [c, T, V]
            sampled = completion_ids[start:start + chunk].unsqueeze(-1)  # [c, T, 1]
            if "logprobs" in names or "entropies" in names:
                logp = torch.log_softmax(logits / self.temperature, dim=-1)  # [c, T, V]
                if "logprobs" in names:
                    parts["logprobs"].append(logp.gather(-1, sampled).squeeze(-1))
                if "entropies" in names:
                    parts["entropies"].append(-(logp.exp() * logp).sum(-1))
            if "certainty" in names:
                parts["certainty"].append(torch.logsumexp(logits, dim=-1) - logits.mean(dim=-1))
            if "token_logits" in names:
                parts["token_logits"].append(logits.gather(-1, sampled).squeeze(-1))
        return {n: torch.cat(v, dim=0) for n, v in parts.items()}

    def _log_credit(self, credit: Any, batch: RolloutBatch, advantages: Tensor, mode: str) -> None:
        for key, value in (credit.metrics.items() if credit is not None else ()):
            self._metrics[mode][key if "/" in key else f"credit/{key}"].append(float(value))
        # TRL logs one GRPO advantage per completion for its completions table; log ours (token mean) instead.
        logged = self._logs["advantages"]
        n = min(batch.B, len(logged))
        for _ in range(n):
            logged.pop()
        m = batch.response_mask
        row_mean = (advantages * m).sum(1) / m.sum(1).clamp_min(1)  # [B]
        logged.extend(row_mean[batch.B - n:].tolist())

    # ---- the implicit PRM in checkpoints ----
    _PRM_FILE = "creditlab_implicit_prm.pt"

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self._prm is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}")
            torch.save(prm_state(self._prm), os.path.join(folder, self._PRM_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, self._PRM_FILE)
        if self._prm is not None:
            if not os.path.exists(path):
                raise ValueError(f"checkpoint {resume_from_checkpoint} has no {self._PRM_FILE}: it was not saved "
                                 "by a CreditGRPOTrainer with an implicit PRM")
            load_prm_state(self._prm, torch.load(path, map_location="cpu", weights_only=True))


def prm_state(scorer: Any) -> dict[str, Any]:
    """The implicit PRM's weights, its frozen reference's (if any) and its optimizer state (tensors + plain values)."""
    get = getattr(scorer, "state_dict", None)
    if callable(get):
        return get()
    state = {"prm": scorer.prm.state_dict(), "optim": scorer.optim.state_dict()}
    if scorer.ref is not None:
        state["ref"] = scorer.ref.state_dict()
    return state


def load_prm_state(scorer: Any, state: dict[str, Any]) -> None:
    load = getattr(scorer, "load_state_dict", None)
    if callable(load):
        load(state)
        return
    if ("ref" in state) != (scorer.ref is not None):
        raise ValueError("the checkpoint's implicit PRM and this one differ in their reference (frozen model or "
                         "the rollout policy's log-probs)")
    scorer.prm.load_state_dict(state["prm"])
    if scorer.ref is not None:
        scorer.ref.load_state_dict(state["ref"])
    scorer.optim.load_state_dict(state["optim"])
