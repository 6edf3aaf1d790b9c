"""Where `CreditGRPOTrainer` gets the RolloutBatch fields that TRL's generation output does not hold.

Each source runs once per generation batch on *this process's* rows (a local `RolloutBatch`) and returns local
tensors; the trainer pads and gathers them over processes afterwards. The TRL-idiomatic inputs:

- step signals: a step splitter (`Segmenter`, default "newline") gives `step_ids`; *step-reward functions*,
  called like TRL reward functions with an extra `steps=` argument (each completion's step texts), return one
  score per step -> `step_rewards`; a *step-label function* returns True/False/None per step -> `step_labels`.
- per-row fields (`strata`, `traj_ids`, `anchor_obs`): a dataset column name, or a function called like a TRL
  reward function that returns one integer per completion.
- `planning_mask`: creditlab's strategic-gram detector run on the completions (HICRA).
- `prm_logprobs` (+ its own `ref_logprobs`, `step_rewards`): an implicit PRM, a second model trained online
  (`creditlab.signals.implicit.ImplicitPRMScorer`; PRIME, OPRL).
- anything else (`values` for gae, ...): `field_producers={"values": fn}`, fn(local RolloutBatch) -> tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch
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
from creditlab.signals.steps import Segmenter

__all__ = ["ROW_FIELDS", "TURN_FIELDS", "LocalRows", "StepSource", "func_name", "implicit_prm_fields",
           "planning_fields", "row_field_values"]



@dataclass
class LocalRows:
    """What TRL handed its reward functions for this process's rows (read by the sources)."""

    tokenizer: Any
    prompts: list[Any]
    completions: list[Any]
    completion_ids: list[list[int]]
    columns: dict[str, list[Any]] = field(default_factory=dict)  # dataset columns, one value per row
    rank: int = 0

    def call(self, fn: Callable[..., Any], **extra: Any) -> list[Any]:
        """Call `fn` the way TRL calls a reward function (plus `extra` keywords); check one result per row."""
        out = list(fn(prompts=self.prompts, completions=self.completions, completion_ids=self.completion_ids,
                      **extra, **self.columns))
        if len(out) != len(self.prompts):
            raise ValueError(f"{func_name(fn)!r} returned {len(out)} values for {len(self.prompts)} completions "
                             "(one per completion expected)")
        return out

    def context(self, model: Any = None) -> SimpleNamespace:
        """The `SignalContext`-like object creditlab's signal code reads (policy.tokenizer, no task scores)."""
        return SimpleNamespace(policy=SimpleNamespace(tokenizer=self.tokenizer, model=model), scores=(),
                               problems=())


def func_name(fn: Any) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class StepSource:
    """step_ids from a splitter; step_rewards from step-reward functions; step_labels from a step-label function."""

    def __init__(self, split: str | Segmenter = "newline", reward_funcs: Sequence[Callable[..., Any]] = (),
                 reward_weights: Sequence[float] | None = None, label_func: Callable[..., Any] | None = None
                 ) -> None:
        self.segmenter = split if isinstance(split, Segmenter) else Segmenter(split)
        if self.segmenter.mode == "task":
            raise ValueError("step_split='task' needs a creditlab task's verifier; in TRL use 'newline', "
                             "'double_newline' or Segmenter('regex', pattern)")
        self.reward_funcs = list(reward_funcs)
        weights = [1.0] * len(self.reward_funcs) if reward_weights is None else [float(w) for w in reward_weights]
        if len(weights) != len(self.reward_funcs):
            raise ValueError(f"step_reward_weights has {len(weights)} entries for {len(self.reward_funcs)} "
                             "step reward functions")
        self.reward_weights = weights
        self.label_func = label_func

    def produce(self, batch: RolloutBatch, rows: LocalRows, wanted: set[str]) -> dict[str, Tensor]:
        seg = segment(batch.response_ids, batch.response_mask, rows.tokenizer, self.segmenter)
        out = {"step_ids": seg.step_ids}
        steps = [seg.step_texts(b) for b in range(batch.B)]
        where = f"completion (of process {rows.rank})"
        rule = f"step_split={self.segmenter.mode!r}"
        if "step_rewards" in wanted and self.reward_funcs:
            out["step_rewards"] = sum(  # [b, S]
                w * step_scores(rows.call(fn, steps=steps), seg, where=where,
                                source=f"step reward function {func_name(fn)!r} ({rule})")
                for fn, w in zip(self.reward_funcs, self.reward_weights))
        if "step_labels" in wanted and self.label_func is not None:
            out["step_labels"] = step_labels(rows.call(self.label_func, steps=steps), seg, where=where,
                                             source=f"step label function {func_name(self.label_func)!r} ({rule})")
        return out


def row_field_values(name: str, source: str | Callable[..., Any], rows: LocalRows, device: Any,
                     batch: RolloutBatch | None = None) -> Tensor:
    """[b] long values of a per-row field, or [b,N] values of a per-turn field (`TURN_FIELDS`: one list per
    completion, one value per turn of its `turn_ids`, else of the runs of its action mask), from a dataset column
    or a rollout_func output key (str: TRL hands both to reward functions) or a TRL-style function."""
    if isinstance(source, str):
        if source not in rows.columns:
            raise ValueError(f"row_fields[{name!r}] names column {source!r}, which neither the dataset nor the "
                             f"rollout_func output has; columns: {sorted(rows.columns)}")
        values = rows.columns[source]
    else:
        values = rows.call(source)
    if name in TURN_FIELDS:
        if batch is None:
            raise ValueError(f"row_fields[{name!r}] is a per-turn field: it needs the batch's turns")
        turns = batch.turn_ids if batch.turn_ids is not None else turn_ids_from_mask(batch.response_mask)
        return turn_values(name, values, turns, source=f"row_fields[{name!r}]", where="completion").to(device)
    try:
        return torch.tensor([int(v) for v in values], dtype=torch.long, device=device)  # [b]
    except (TypeError, ValueError):
        raise ValueError(f"row_fields[{name!r}] must give one integer per completion, got {list(values)[:4]}"
                         ) from None


def planning_fields(batch: RolloutBatch, rows: LocalRows, grams: Sequence[str] | None) -> dict[str, Tensor]:
    """planning_mask [b,T] from the strategic-gram detector on the decoded completions (HICRA)."""
    return {"planning_mask": planning_mask(batch.response_ids, batch.response_mask, rows.tokenizer, grams)}


def implicit_prm_fields(scorer: Any, batch: RolloutBatch, rows: LocalRows) -> dict[str, Tensor]:
    """prm_logprobs, ref_logprobs (the PRM's own reference) and step_rewards/step_ids from the implicit PRM."""
    return dict(scorer.produce(batch, rows.context()))
