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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import FIELDS, RolloutBatch
from creditlab.signals.steps import Segmenter, pad_step_values

__all__ = ["ROW_FIELDS", "LocalRows", "StepSource", "func_name", "implicit_prm_fields", "planning_fields",
           "row_field_values"]

ROW_FIELDS = tuple(n for n, s in FIELDS.items() if s.shape == ("B",) and s.kind == "long" and n != "group_ids")


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
        seg = self.segmenter.segment(batch, rows.context())
        out = {"step_ids": seg.step_ids}
        steps = [seg.step_texts(b) for b in range(batch.B)]
        S = seg.num_steps
        device = batch.response_ids.device
        if "step_rewards" in wanted and self.reward_funcs:
            total = torch.zeros(batch.B, S, device=device)
            for fn, w in zip(self.reward_funcs, self.reward_weights):
                scores = self._per_step(fn, rows, steps, kind="score")
                total += w * pad_step_values(scores, S, device=device)
            out["step_rewards"] = total  # [b, S]
        if "step_labels" in wanted and self.label_func is not None:
            labels = self._per_step(self.label_func, rows, steps, kind="label")
            padded = torch.full((batch.B, S), -1, dtype=torch.long)
            for b, row in enumerate(labels):
                padded[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            out["step_labels"] = padded.to(device)  # [b, S]
        return out

    def _per_step(self, fn: Callable[..., Any], rows: LocalRows, steps: list[list[str]], kind: str
                  ) -> list[list[float]]:
        values = rows.call(fn, steps=steps)
        out = []
        for b, (row, texts) in enumerate(zip(values, steps)):
            row = list(row) if row is not None else None
            where = f"completion {b} of process {rows.rank}"
            if row is None or len(row) != len(texts):
                raise ValueError(f"step {kind} function {func_name(fn)!r} returned {row!r} for {where}, which has "
                                 f"{len(texts)} step(s) under step_split={self.segmenter.mode!r}: {texts[:4]}")
            out.append([_label(v, fn, where) if kind == "label" else _score(v, fn, where) for v in row])
        return out


def _score(v: Any, fn: Any, where: str) -> float:
    if v is None or not math.isfinite(float(v)):
        raise ValueError(f"step reward function {func_name(fn)!r} returned {v!r} for a step of {where}; step "
                         "scores must be finite numbers")
    return float(v)


def _label(v: Any, fn: Any, where: str) -> int:
    if v is None:
        return -1
    if isinstance(v, bool) or v in (0, 1, -1):
        return int(v)
    raise ValueError(f"step label function {func_name(fn)!r} returned {v!r} for a step of {where}; labels are "
                     "True/1 (right), False/0 (wrong) or None/-1 (no label)")


def row_field_values(name: str, source: str | Callable[..., Any], rows: LocalRows, device: Any) -> Tensor:
    """[b] long values of a per-row field from a dataset column (str) or a TRL-style function."""
    if isinstance(source, str):
        if source not in rows.columns:
            raise ValueError(f"row_fields[{name!r}] names dataset column {source!r}, which the dataset does not "
                             f"have; columns: {sorted(rows.columns)}")
        values = rows.columns[source]
    else:
        values = rows.call(source)
    try:
        return torch.tensor([int(v) for v in values], dtype=torch.long, device=device)  # [b]
    except (TypeError, ValueError):
        raise ValueError(f"row_fields[{name!r}] must give one integer per completion, got {list(values)[:4]}"
                         ) from None


def planning_fields(batch: RolloutBatch, rows: LocalRows, grams: Sequence[str] | None) -> dict[str, Tensor]:
    """planning_mask [b,T] from the strategic-gram detector on each decoded completion (HICRA).

    Token character spans come from `token_char_spans` (exact for any tokenizer, SentencePiece and word-level
    included: decoding tokens one by one drops their separating spaces there); special tokens are never
    planning tokens.
    """
    from creditlab.signals.steps import token_char_spans
    from creditlab.signals.strategic import DEFAULT_STRATEGIC_GRAMS, token_mask_from_spans

    grams = grams if grams is not None else DEFAULT_STRATEGIC_GRAMS
    ids, mask = batch.response_ids.cpu(), batch.response_mask.cpu()
    out = torch.zeros(ids.shape, dtype=torch.bool)  # [b, T]
    for b in range(ids.shape[0]):
        cols = mask[b].nonzero().squeeze(1)
        spans, text = token_char_spans(rows.tokenizer, ids[b, cols].tolist())
        out[b, cols] = token_mask_from_spans(text, spans, grams)
    return {"planning_mask": out.to(batch.response_ids.device)}


def implicit_prm_fields(scorer: Any, batch: RolloutBatch, rows: LocalRows) -> dict[str, Tensor]:
    """prm_logprobs, ref_logprobs (the PRM's own reference) and step_rewards/step_ids from the implicit PRM."""
    return dict(scorer.produce(batch, rows.context()))
