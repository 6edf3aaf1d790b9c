"""Strategic-gram detector (HICRA planning tokens) and semantic entropy (methods.md §5.1).

A *strategic gram* is a short phrase that signals high-level planning ("let's try", "wait", "on second
thought"). HICRA amplifies credit on the tokens that spell such phrases, so this module turns decoded text
into a `planning_mask [B,T]`:

1. find gram occurrences in the decoded text (case-insensitive, word-bounded, any whitespace between words);
2. map those character spans onto tokens through the tokenizer's character offsets: a token is a planning
   token iff its span overlaps a match.

Matching on decoded text rather than on token ids catches variants (leading space, capitalisation) that an
id-level match misses. The paper (arXiv 2509.03646) extracts grams automatically: 3-5-word n-grams of correct
solutions, embedded, KMeans-clustered, clusters kept by document frequency, plus hand curation. creditlab ships
the curated list `DEFAULT_STRATEGIC_GRAMS` instead and treats *each gram as its own cluster* (also for
`semantic_entropy`); pass your own list (or a cluster map) for the paper's setting.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# Curated for English step-by-step reasoning: plan, backtrack, verify, decompose, reframe.
DEFAULT_STRATEGIC_GRAMS: tuple[str, ...] = (
    # planning / trying an approach
    "let's try", "let me try", "let's think", "let me think", "let's consider", "let me consider",
    "let's start", "let me start", "we need to", "we want to", "the goal is", "our goal is", "the idea is",
    "the key is", "the key idea", "the trick is", "a better approach", "another approach", "a different approach",
    "one approach", "instead,", "alternatively", "on the other hand",
    # backtracking / reconsidering
    "wait", "hmm", "on second thought", "let me reconsider", "let's reconsider", "let me re-examine",
    "that doesn't seem right", "that can't be right", "i made a mistake", "actually,", "but wait",
    # verification
    "let me check", "let's check", "let me verify", "let's verify", "double-check", "to confirm",
    "sanity check", "plugging back in", "let me make sure",
    # decomposition / structure
    "first,", "second,", "next,", "then,", "finally,", "step by step", "break this down", "break it down",
    "in other words", "this means that", "notice that", "note that", "observe that", "recall that",
    "it follows that", "so far", "to summarize",
)


def compile_grams(grams: Sequence[str]) -> re.Pattern[str]:
    """One case-insensitive regex for all grams: longest first, word-bounded, whitespace runs matched by \\s+.

    Each gram gets a named group `g<i>` (i = its index in `grams`) so a match tells which gram it was.
    """
    if not grams:
        raise ValueError("need at least one strategic gram")
    parts = []
    for i in sorted(range(len(grams)), key=lambda j: -len(grams[j])):
        words = grams[i].strip().split()
        if not words:
            raise ValueError(f"strategic gram {i} is empty")
        body = r"\s+".join(re.escape(w) for w in words)
        parts.append(rf"(?P<g{i}>(?<!\w){body}(?!\w))" if words[-1][-1].isalnum() or words[-1][-1] == "_"
                     else rf"(?P<g{i}>(?<!\w){body})")
    return re.compile("|".join(parts), flags=re.IGNORECASE)


def find_grams(text: str, grams: Sequence[str] = DEFAULT_STRATEGIC_GRAMS) -> list[tuple[int, int, int]]:
    """Non-overlapping gram occurrences in `text`, left to right: (char_start, char_end, gram_index)."""
    pattern = compile_grams(grams)
    return [(m.start(), m.end(), int(m.lastgroup[1:])) for m in pattern.finditer(text)]


def token_mask_from_spans(text: str, token_spans: Sequence[tuple[int, int]],
                          grams: Sequence[str] = DEFAULT_STRATEGIC_GRAMS) -> Tensor:
    """Planning mask [n_tokens] bool for one text whose tokens cover `token_spans` (char [start, end)).

    Pure (no tokenizer): a token is a planning token iff its span overlaps a gram match. Empty spans
    (special tokens, offsets (0, 0)) are never planning tokens.
    """
    hits = torch.zeros(len(text) + 1, dtype=torch.int64)
    for start, end, _ in find_grams(text, grams):
        hits[start] += 1
        hits[end] -= 1
    covered = torch.cat([torch.zeros(1, dtype=torch.int64), (hits.cumsum(0)[:-1] > 0).long().cumsum(0)])  # [C+1]
    if len(token_spans) == 0:
        return torch.zeros(0, dtype=torch.bool)
    spans = torch.tensor(token_spans, dtype=torch.int64).clamp(0, len(text))  # [n,2]
    return (covered[spans[:, 1]] - covered[spans[:, 0]]) > 0


def planning_mask_from_texts(texts: Sequence[str], tokenizer: Any = None, *,
                             offsets: Sequence[Sequence[tuple[int, int]]] | None = None, T: int | None = None,
                             grams: Sequence[str] = DEFAULT_STRATEGIC_GRAMS) -> Tensor:
    """planning_mask [B,T] bool from decoded response texts.

    Character offsets come either from `offsets` (one list of (start, end) per text, e.g. recorded at
    rollout time) or from a HF *fast* tokenizer: tokenizer(texts, return_offsets_mapping=True,
    add_special_tokens=False). Use the tokenizer route only when the response ids *are* the tokenization of
    the text; otherwise use `planning_mask_from_ids`. T defaults to the longest tokenization; longer rows are
    truncated, shorter ones padded with False.
    """
    if offsets is None:
        if tokenizer is None:
            raise ValueError("planning_mask_from_texts needs `offsets` or a fast `tokenizer`")
        enc = tokenizer(list(texts), return_offsets_mapping=True, add_special_tokens=False)
        offsets = [[tuple(o) for o in row] for row in enc["offset_mapping"]]
    if len(offsets) != len(texts):
        raise ValueError(f"got {len(texts)} texts but {len(offsets)} offset lists")
    rows = [token_mask_from_spans(text, spans, grams) for text, spans in zip(texts, offsets)]
    width = T if T is not None else max((r.numel() for r in rows), default=0)
    out = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        n = min(r.numel(), width)
        out[b, :n] = r[:n]
    return out


def planning_mask_from_ids(response_ids: Tensor, response_mask: Tensor, tokenizer: Any,
                           grams: Sequence[str] = DEFAULT_STRATEGIC_GRAMS) -> Tensor:
    """planning_mask [B,T] aligned with the sampled `response_ids`: decode token by token, match, map back.

    Each valid token is decoded on its own (special tokens decode to ""), the pieces are concatenated into the
    text that is matched, and each token's span is its piece's range. Exact for byte-level BPE on ASCII text;
    a multi-byte character split across tokens decodes to replacement characters, which only matters if a
    gram contains it.
    """
    out = torch.zeros(response_ids.shape, dtype=torch.bool)
    for b in range(response_ids.shape[0]):
        cols = response_mask[b].nonzero(as_tuple=True)[0]
        ids = response_ids[b, cols].tolist()
        pieces = [tokenizer.decode([i], skip_special_tokens=True) for i in ids]
        ends = list(_cumsum(len(p) for p in pieces))
        spans = list(zip([0, *ends[:-1]], ends))
        out[b, cols] = token_mask_from_spans("".join(pieces), spans, grams)
    return out


def _cumsum(xs: Any) -> Any:
    total = 0
    for x in xs:
        total += x
        yield total


def gram_counts(texts: Sequence[str], grams: Sequence[str] = DEFAULT_STRATEGIC_GRAMS) -> Tensor:
    """Occurrences of each gram over all texts: [n_grams] long."""
    counts = torch.zeros(len(grams), dtype=torch.int64)
    pattern = compile_grams(grams)
    for text in texts:
        for m in pattern.finditer(text):
            counts[int(m.lastgroup[1:])] += 1
    return counts


def entropy_of_counts(counts: Sequence[float] | Tensor) -> float:
    """-sum p ln p (nats) of a count vector; 0 when there are no counts."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    total = float(c.sum())
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * p.log()).sum())


def semantic_entropy(texts: Sequence[str], grams: Sequence[str] = DEFAULT_STRATEGIC_GRAMS,
                     clusters: Sequence[int] | None = None) -> float:
    """HICRA's semantic entropy H = -sum_g p_g ln p_g (nats) of strategic-gram occurrences in `texts`.

    p_g = occurrences of cluster g / all occurrences. By default each gram is its own cluster (the paper
    clusters n-grams by sentence embeddings); `clusters[i]` maps gram i to a cluster id to merge grams.
    A batch with no gram occurrence has entropy 0. Log it next to token entropy (exploration signal).
    """
    counts = gram_counts(texts, grams)
    if clusters is not None:
        if len(clusters) != len(grams):
            raise ValueError(f"clusters has {len(clusters)} entries for {len(grams)} grams")
        ids = torch.as_tensor(clusters, dtype=torch.int64)
        counts = torch.zeros(int(ids.max()) + 1, dtype=torch.int64).index_add_(0, ids, counts)
    return entropy_of_counts(counts)


def semantic_entropy_from_counts(counts: Sequence[float]) -> float:
    """Alias of `entropy_of_counts` for callers that count clusters themselves (methods.md: [2,1,1] -> 1.0397)."""
    return entropy_of_counts(counts)


__all__ = ["DEFAULT_STRATEGIC_GRAMS", "compile_grams", "entropy_of_counts", "find_grams", "gram_counts",
           "planning_mask_from_ids", "planning_mask_from_texts", "semantic_entropy", "semantic_entropy_from_counts",
           "token_mask_from_spans"]
