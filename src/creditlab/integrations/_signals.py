"""Signal plumbing shared by the TRL trainer and the verl hook: steps, per-step values, planning tokens and turns."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import FIELDS, RolloutBatch
from creditlab.signals.steps import Segmentation, Segmenter, pad_step_values

# Per-row integer fields an integration reads from a dataset column or the reward's extra info.
ROW_FIELDS = tuple(n for n, s in FIELDS.items() if s.shape == ("B",) and s.kind == "long" and n != "group_ids")
# Per-turn fields [B,N] an integration reads as one list per row (one value per turn) from the same places.
TURN_FIELDS = tuple(n for n, s in FIELDS.items() if s.shape == ("B", "N"))


def turn_ids_from_mask(action_mask: Tensor) -> Tensor:
    """turn_ids [B,T] from a multi-turn action mask: turn k of a row is its k-th maximal run of model tokens
    (True) between environment/tool tokens (False); -1 outside the mask. A row without tool tokens is one turn.
    This is the layout verl's agent loop (response_mask 0 on tool responses) and TRL's tool_mask / a
    rollout_func's env_mask give."""
    m = action_mask.bool()
    start = m & ~torch.nn.functional.pad(m, (1, 0))[:, :-1]  # [B,T] first token of each run
    return torch.where(m, start.long().cumsum(1) - 1, -1)


def turn_values(name: str, values: Sequence[Any], turn_ids: Tensor, *, source: str,
                where: str = "row") -> Tensor:
    """[B,N] per-turn field `name` from one list per row with one value per turn of that row (its turns in
    `turn_ids`); N = the most turns in the batch, padding 0 (the field's convention). anchor_states take ints or
    state keys (strings, hashed by `envs.base.state_hash`, as creditlab's environments do); the floats must be
    finite. A count that does not match the row's turns is an error naming the row; a row with no turn left in
    its mask (TRL's mask_truncated_completions zeroes a truncated completion's) takes zeros whatever it was given."""
    from creditlab.envs.base import state_hash

    counts = (turn_ids.max(dim=1).values + 1).clamp(min=0).tolist() if turn_ids.numel() else [0] * len(values)
    values = list(values)
    if len(values) != len(counts):
        raise ValueError(f"{source} gave {len(values)} lists for {len(counts)} {where}s")
    is_long = FIELDS[name].kind == "long"
    out = torch.zeros((len(counts), max([*counts, 1])), dtype=torch.long if is_long else torch.float32)
    for b, (row, n) in enumerate(zip(values, counts)):
        if n == 0:
            continue
        row = list(row) if hasattr(row, "__len__") and not isinstance(row, (str, bytes, dict)) else row
        if not isinstance(row, list) or len(row) != n:
            got = f"{len(row)} values" if isinstance(row, list) else repr(row)
            raise ValueError(f"{source} gave {got} for {where} {b}, which has {n} turn(s) (runs of model tokens "
                             f"between tool/environment tokens): RolloutBatch.{name} needs one value per turn")
        for k, v in enumerate(row):
            if is_long:
                out[b, k] = state_hash(v) if isinstance(v, str) else _integer(v, source, b, name)
            else:
                x = _finite(v)
                if x is None:
                    raise ValueError(f"{source} gave {v!r} in row {b}; RolloutBatch.{name} values must be finite "
                                     "numbers")
                out[b, k] = x
    return out.to(turn_ids.device)


def _integer(v: Any, source: str, b: int, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v != int(v):
        raise ValueError(f"{source} gave {v!r} in row {b}; RolloutBatch.{name} takes integers or state strings")
    return int(v)


def segment(response_ids: Tensor, response_mask: Tensor, tokenizer: Any, segmenter: Segmenter) -> Segmentation:
    """Steps of every row (`Segmenter` on the decoded valid tokens): step_ids [B,T], spans, texts."""
    if segmenter.mode == "task":
        raise ValueError("step split 'task' needs a creditlab task's verifier; use 'newline', 'double_newline' "
                         "or 'regex'")
    b = response_ids.shape[0]
    rows = RolloutBatch(response_ids=response_ids, response_mask=response_mask,
                        group_ids=torch.zeros(b, dtype=torch.long), rewards=torch.zeros(b))
    ctx = SimpleNamespace(policy=SimpleNamespace(tokenizer=tokenizer), scores=(), problems=())
    return segmenter.segment(rows, ctx)


def step_scores(values: Sequence[Any], seg: Segmentation, *, source: str, where: str = "row") -> Tensor:
    """[B,S] float32 from one list of per-step scores per row; the count must match the row's steps."""
    rows = _per_step(values, seg, source=source, where=where, kind="score")
    return pad_step_values(rows, seg.num_steps, device=seg.step_ids.device)


def step_labels(values: Sequence[Any], seg: Segmentation, *, source: str, where: str = "row") -> Tensor:
    """[B,S] long in {1, 0, -1} from True/False/None (or 1/0/-1) per step; padding -1."""
    rows = _per_step(values, seg, source=source, where=where, kind="label")
    out = torch.full((len(rows), seg.num_steps), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out.to(seg.step_ids.device)


def _per_step(values: Sequence[Any], seg: Segmentation, *, source: str, where: str, kind: str) -> list[list[Any]]:
    if len(values) != len(seg.spans):
        raise ValueError(f"{source} gave {len(values)} rows of step {kind}s for {len(seg.spans)} responses")
    out = []
    for b, row in enumerate(values):
        steps = seg.step_texts(b)
        row = None if row is None else list(row)
        if row is None or len(row) != len(steps):
            raise ValueError(f"{source} gave {row!r} for {where} {b}, which has {len(steps)} step(s): {steps[:4]}")
        out.append([_label(v, source, b, where) if kind == "label" else _score(v, source, b, where) for v in row])
    return out


def _finite(v: Any) -> float | None:
    """`v` as a finite float, or None (not a number, nan or inf): step scores and per-turn floats alike."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _score(v: Any, source: str, b: int, where: str) -> float:
    x = _finite(v)
    if x is None:
        raise ValueError(f"{source} gave the step score {v!r} for {where} {b}; step scores must be finite numbers")
    return x


def _label(v: Any, source: str, b: int, where: str) -> int:
    if v is None:
        return -1
    if isinstance(v, bool) or v in (0, 1, -1):
        return int(v)
    raise ValueError(f"{source} gave the step label {v!r} for {where} {b}; labels are True/1 (right), False/0 "
                     "(wrong) or None/-1 (no label)")


def planning_mask(response_ids: Tensor, response_mask: Tensor, tokenizer: Any,
                  grams: Sequence[str] | None = None) -> Tensor:
    """planning_mask [B,T] from the strategic-gram detector on each row's decoded valid tokens (HICRA).

    Token character spans come from `token_char_spans` (exact for any tokenizer, SentencePiece and word-level
    included, where decoding tokens one by one drops their separating spaces); special tokens never plan.
    """
    from creditlab.signals.steps import token_char_spans
    from creditlab.signals.strategic import DEFAULT_STRATEGIC_GRAMS, token_mask_from_spans

    grams = grams if grams is not None else DEFAULT_STRATEGIC_GRAMS
    ids, mask = response_ids.cpu(), response_mask.cpu()
    out = torch.zeros(ids.shape, dtype=torch.bool)  # [B, T]
    for b in range(ids.shape[0]):
        cols = mask[b].nonzero().squeeze(1)
        spans, text = token_char_spans(tokenizer, ids[b, cols].tolist())
        out[b, cols] = token_mask_from_spans(text, spans, grams)
    return out.to(response_ids.device)
