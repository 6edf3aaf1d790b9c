"""Step segmentation: split each response into steps and map the steps onto its tokens -> `step_ids [B,T]`.

    seg = Segmenter("newline")                     # or "double_newline", Segmenter("regex", r";\\s*"), "task"
    out = seg.segment(batch, ctx)                  # Segmentation(step_ids [B,T], spans, texts)
    batch = batch.replace(step_ids=out.step_ids)

**Steps in text.** A mode names the separator between steps:

- ``"newline"``: every non-blank line is a step (separator ``\\n``);
- ``"double_newline"``: paragraphs separated by a blank line (separator ``\\n[ \\t\\r]*\\n``; PRM800K/Qwen-PRM style);
- ``"regex"``: the separator is the regular expression ``pattern`` (``re.split`` semantics);
- ``"markers"``: VSRM's marker-word rule (arXiv 2508.10293): a new step starts at each sentence that contains a
  marker word (``pattern``: a regex alternation of words, default ``MARKER_WORDS`` = However|Therefore|So|But|Wait,
  whole words, case-sensitive); a marker in mid-sentence moves the split to the start of its sentence (after
  ``.``/``!``/``?`` and whitespace, or a newline). The paper's other readability rules (skipping the opening
  restatement, a minimum distance between split points) are not reproduced;
- ``"task"``: the task's own step format, i.e. the verifier's ``Score.step_spans`` (e.g. the ``a op b = c``
  lines of ``arith_chain``); text outside those spans (the ``Answer:`` line) belongs to no step.

Each step's span is trimmed of surrounding whitespace and empty pieces are dropped, so separators and blank
lines belong to no step. Step k is the k-th span in text order; a response may have zero steps.

**Steps in tokens (the token rule).** Tokenizers do not respect step boundaries: a byte-level BPE token can be
``".\\n"`` or ``"\\n7"``. Token t's character span in the decoded response comes from `token_char_spans`.
Then token t belongs to

1. the step that contains its *first non-whitespace character*; so ``".\\n"`` ends the step before the newline
   and ``"\\n7"`` starts the step after it;
2. if the token is all whitespace, or its first non-whitespace character lies in no step, the step its span
   overlaps most (ties: the earlier step), or none (-1) when it overlaps no step (a pure separator ``"\\n\\n"``);
3. a token with an empty span (a byte that only completes a multi-byte character) takes the step of the
   character it completes (the one just before its position).

Special tokens (EOS, padding: the tokenizer's ``all_special_ids``) and every token outside `response_mask` are -1.
Decoding is per row; the assignment itself is vectorized.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from creditlab.batch import RolloutBatch

SplitMode = Literal["newline", "double_newline", "regex", "markers", "task"]
SPLIT_MODES: tuple[str, ...] = ("newline", "double_newline", "regex", "markers", "task")
MARKER_WORDS = "However|Therefore|So|But|Wait"  # VSRM's step-opening words (methods.md §12.2)
_SENTENCE_END = re.compile(r"(?:[.!?][ \t]+|\n[ \t]*)")
SEPARATORS: dict[str, str] = {"newline": r"\n", "double_newline": r"\n[ \t\r]*\n"}

Span = tuple[int, int]


def split_steps(text: str, mode: str = "newline", *, pattern: str | None = None) -> list[Span]:
    """Character spans ``[start, end)`` of the steps of ``text`` (whitespace-trimmed, non-empty, in order).

    ``mode`` is "newline", "double_newline" or "regex" (then ``pattern`` is the separator regex). The "task"
    mode has no text rule: its spans come from the task's verifier (see `Segmenter`).
    """
    if mode == "markers":
        return _spans_between(text, marker_split_points(text, pattern or MARKER_WORDS))
    if mode == "regex":
        if not pattern:
            raise ValueError("split mode 'regex' needs a separator pattern, e.g. pattern=r';\\s*'")
        sep = pattern
    elif mode in SEPARATORS:
        sep = SEPARATORS[mode]
    else:
        raise ValueError(f"unknown split mode {mode!r} for split_steps; valid: {list(SEPARATORS)} + ['regex', "
                         "'markers']")
    spans: list[Span] = []
    start = 0
    for m in [*re.finditer(sep, text), None]:
        end = m.start() if m is not None else len(text)
        if m is not None and m.end() == m.start():  # an empty match would split inside a step: ignore it
            continue
        piece = text[start:end]
        lead = len(piece) - len(piece.lstrip())
        body = piece.strip()
        if body:
            spans.append((start + lead, start + lead + len(body)))
        if m is not None:
            start = m.end()
    return spans


def marker_split_points(text: str, words: str = MARKER_WORDS) -> list[int]:
    """Character positions where a new step starts under the "markers" rule (sorted, > 0)."""
    points: set[int] = set()
    for m in re.finditer(rf"\b(?:{words})\b", text):
        ends = [e.end() for e in _SENTENCE_END.finditer(text, 0, m.start())]
        start = ends[-1] if ends else 0  # start of the sentence holding the marker
        if start > 0:
            points.add(start)
    return sorted(points)


def _spans_between(text: str, points: Sequence[int]) -> list[Span]:
    """Whitespace-trimmed non-empty spans between consecutive split points (0 and len(text) implied)."""
    spans: list[Span] = []
    for start, end in zip([0, *points], [*points, len(text)]):
        piece = text[start:end]
        body = piece.strip()
        if body:
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + lead + len(body)))
    return spans


def token_char_spans(tokenizer: Any, ids: Sequence[int]) -> tuple[list[Span], str]:
    """Character span ``[start, end)`` of each token in ``text = decode(ids)``, and that text.

    Fast path (char-level, byte-level BPE on ASCII text): when the per-token decodes concatenate to the full
    decode, spans are cumulative lengths (one batched decode). Otherwise (SentencePiece's leading-space rule,
    multi-byte characters split over tokens) the exact slow path decodes growing prefixes: a token's end is
    the length of the decoded prefix through it, and a token that only completes a character gets an empty span.
    Special tokens are skipped, as the rollout's ``texts`` are.
    """
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    pieces = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=True) if ids else []
    if "".join(pieces) == text:
        ends = torch.tensor([len(p) for p in pieces], dtype=torch.long).cumsum(0).tolist()
        return [(e - len(p), e) for p, e in zip(pieces, ends)], text
    spans, prev = [], 0
    for t in range(len(ids)):
        end = max(prev, len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True)))
        spans.append((prev, end))
        prev = end
    return spans, text


def assign_tokens(text: str, token_spans: Sequence[Span], step_spans: Sequence[Span]) -> Tensor:
    """Step index of each token by the token rule of the module docstring: [n] long, -1 = no step."""
    n = len(token_spans)
    if n == 0 or not step_spans:
        return torch.full((n,), -1, dtype=torch.long)
    L = len(text)
    tok = torch.tensor(token_spans, dtype=torch.long).clamp(0, L)  # [n, 2]
    st = torch.tensor(step_spans, dtype=torch.long)  # [S, 2]
    char_step = torch.full((L + 1,), -1, dtype=torch.long)  # [L+1] step of each character (slot L: none)
    for k, (s, e) in enumerate(step_spans):
        char_step[s:e] = k
    # next_ns[i] = first non-whitespace position >= i (L if none): a reverse cumulative minimum.
    is_ns = torch.tensor([not c.isspace() for c in text] + [True], dtype=torch.bool)  # [L+1]
    pos = torch.where(is_ns, torch.arange(L + 1), torch.full((L + 1,), L))
    next_ns = pos.flip(0).cummin(0).values.flip(0)  # [L+1]
    start, end = tok[:, 0], tok[:, 1]
    first = next_ns[start]  # [n]
    rule1 = torch.where(first < end, char_step[first], torch.full_like(first, -1))  # first non-ws char's step
    overlap = (torch.minimum(end[:, None], st[None, :, 1]) - torch.maximum(start[:, None], st[None, :, 0]))
    best, arg = overlap.clamp_min(0).max(dim=1)  # [n]; ties -> first (earlier) step
    rule2 = torch.where(best > 0, arg, torch.full_like(arg, -1))
    rule3 = char_step[(start - 1).clamp_min(0)].masked_fill(start == 0, -1)  # empty span: the completed char
    empty = end <= start
    return torch.where(empty, rule3, torch.where(rule1 >= 0, rule1, rule2))


def step_sum(values: Tensor, step_ids: Tensor, S: int) -> Tensor:
    """Sum of ``values [B,T]`` over each step's tokens -> ``[B,S]`` (tokens with step -1 are dropped)."""
    B = values.shape[0]
    inside = step_ids >= 0  # [B, T]
    index = torch.where(inside, step_ids, torch.zeros_like(step_ids))
    out = torch.zeros(B, max(S, 1), dtype=values.dtype, device=values.device)
    return out.scatter_add(1, index, torch.where(inside, values, torch.zeros_like(values)))  # [B, S]


def n_steps_of(step_ids: Tensor) -> Tensor:
    """Number of steps of each row, ``max(step_ids) + 1`` ([B] long; 0 for a row without steps)."""
    return (step_ids.max(dim=1).values + 1).clamp_min(0) if step_ids.shape[1] else step_ids.new_zeros(len(step_ids))


@dataclass
class Segmentation:
    """Steps of a batch: ``step_ids [B,T]`` (see `FIELDS`), per-row step character spans and the decoded texts.

    ``spans[b]`` indexes ``texts[b]``; ``S = num_steps`` = max over rows of ``len(spans[b])``, at least 1
    (a batch whose responses have no steps still gets one padded step column).
    """

    step_ids: Tensor
    spans: list[list[Span]]
    texts: list[str]

    @property
    def num_steps(self) -> int:
        return max([len(s) for s in self.spans] + [1])

    def step_texts(self, b: int) -> list[str]:
        """The text of each step of row ``b``."""
        return [self.texts[b][s:e] for s, e in self.spans[b]]


@dataclass(frozen=True)
class Segmenter:
    """A step-splitting rule (``mode`` in `SPLIT_MODES`, ``pattern`` for "regex") applied to a whole batch."""

    mode: str = "newline"
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in SPLIT_MODES:
            raise ValueError(f"unknown step split mode {self.mode!r}; valid: {list(SPLIT_MODES)}")
        if self.mode == "regex":
            split_steps("", "regex", pattern=self.pattern)  # fail at construction on a missing pattern
            re.compile(self.pattern or "")
        if self.mode == "markers" and self.pattern:
            re.compile(self.pattern)

    def spans(self, text: str, score: Any = None) -> list[Span]:
        """Step spans of one response; "task" reads ``score.step_spans`` (the task verifier's steps)."""
        if self.mode != "task":
            return split_steps(text, self.mode, pattern=self.pattern)
        spans = getattr(score, "step_spans", None)
        if spans is None:
            raise ValueError("step split mode 'task' needs a task whose Score has step_spans (e.g. arith_chain); "
                             "use mode 'newline', 'double_newline' or 'regex' otherwise")
        return sorted((int(s), int(e)) for s, e in spans)

    def segment(self, batch: RolloutBatch, ctx: Any) -> Segmentation:
        """Decode every row with ``ctx.policy.tokenizer``, split it into steps and assign its tokens."""
        B, T = batch.response_ids.shape
        tokenizer = ctx.policy.tokenizer
        scores = list(getattr(ctx, "scores", ()) or ())
        step_ids = torch.full((B, T), -1, dtype=torch.long)
        all_spans: list[list[Span]] = []
        texts: list[str] = []
        mask = batch.response_mask.cpu()
        ids_cpu = batch.response_ids.cpu()
        for b in range(B):
            cols = mask[b].nonzero().squeeze(1)  # masked-in columns (observation tokens of multi-turn rows out)
            tok_spans, text = token_char_spans(tokenizer, ids_cpu[b, cols].tolist())
            if self.mode == "task" and batch.texts is not None and batch.texts[b] != text:
                raise ValueError(f"row {b}: the task scored a text that differs from decode(response_ids); "
                                 "its step_spans cannot be mapped onto tokens")
            spans = self.spans(text, scores[b] if b < len(scores) else None)
            row = ids_cpu[b, cols]
            special = torch.isin(row, torch.tensor(list(getattr(tokenizer, "all_special_ids", [])), dtype=torch.long))
            step_ids[b, cols] = assign_tokens(text, tok_spans, spans).masked_fill(special, -1)
            all_spans.append(spans)
            texts.append(text)
        return Segmentation(step_ids.to(batch.response_ids.device), all_spans, texts)


def pad_step_values(rows: Sequence[Sequence[float]], S: int, *, device: torch.device | str = "cpu") -> Tensor:
    """Ragged per-step values -> ``[B, S]`` float32 with 0 in the padding (``S`` >= every row's length, >= 1)."""
    S = max([S, 1, *(len(r) for r in rows)])
    out = torch.zeros(len(rows), S, dtype=torch.float32)
    for b, r in enumerate(rows):
        if len(r):
            out[b, : len(r)] = torch.as_tensor(list(r), dtype=torch.float32)
    return out.to(device)


def step_ids_signal(batch: RolloutBatch, ctx: Any, *, mode: str = "newline", pattern: str | None = None
                    ) -> dict[str, Tensor]:
    """Producer form (``PRODUCERS`` signature): ``{"step_ids": [B,T]}`` under the given split rule."""
    return {"step_ids": Segmenter(mode, pattern).segment(batch, ctx).step_ids}
