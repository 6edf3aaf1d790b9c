"""Signal plumbing shared by the TRL trainer and the verl hook: steps, per-step values and planning tokens."""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from creditlab.batch import FIELDS, RolloutBatch
from creditlab.signals.steps import Segmentation, Segmenter, pad_step_values

# Per-row integer fields an integration reads from a dataset column or the reward's extra info.
ROW_FIELDS = tuple(n for n, s in FIELDS.items() if s.shape == ("B",) and s.kind == "long" and n != "group_ids")


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


def _score(v: Any, source: str, b: int, where: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
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
