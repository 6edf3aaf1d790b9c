"""Stratum functions for Stratified GRPO (`strata [B]`, methods.md §6.2).

A stratum groups trajectories of the same *structure*, so that advantages compare peers only. The paper
(arXiv 2510.06214) stratifies search-agent trajectories by their number of search calls; for plain
reasoning tasks the analogous structural count is the number of reasoning steps. Defaults offered here:

- `strata_by_pattern_count(texts, pattern)`: number of tool calls (e.g. "<search>") per response: the
  paper's choice for search agents.
- `strata_by_step_count(step_ids)`: number of reasoning steps per response (from `creditlab.signals.steps`);
  the recommended default for step-structured reasoning tasks.
- `strata_by_length(response_mask, bins)`: length buckets, a coarse proxy when no structure is available.
- `strata_by_tool_calls(scores, tool)`: the number of calls of one tool per *episode*, counted by the environment
  (multi-turn rollouts return `EpisodeScore`s with their tool calls); the search task's strata are its
  ``search`` calls, exactly the paper's. Filled by the agent component (`creditlab.train.agent`).

Counts can be capped (`max_stratum`) so that rare large counts share one stratum instead of forming
singleton strata (which get a SAN advantage of 0).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor


def _cap(strata: Tensor, max_stratum: int | None) -> Tensor:
    return strata if max_stratum is None else strata.clamp_max(max_stratum)


def strata_by_step_count(step_ids: Tensor, *, max_stratum: int | None = None) -> Tensor:
    """Number of distinct steps per response: [B,T] step_ids (-1 = no step) -> [B] long.

    Steps are counted as distinct ids, so non-contiguous or unnumbered-gap ids are still counted correctly.
    """
    b = step_ids.shape[0]
    s = int(step_ids.max()) + 1 if step_ids.numel() else 0
    seen = torch.zeros(b, max(s, 1) + 1, dtype=torch.bool)
    seen.scatter_(1, (step_ids + 1).clamp_min(0), torch.ones_like(step_ids, dtype=torch.bool))  # column 0 = "-1"
    return _cap(seen[:, 1:].sum(1).long(), max_stratum)


def strata_by_length(response_mask: Tensor, bins: Sequence[int]) -> Tensor:
    """Length bucket per response: stratum k holds lengths in [bins[k-1], bins[k]) (bins sorted, ascending).

    Example: bins=(256, 1024) gives 0 for L < 256, 1 for 256 <= L < 1024, 2 for L >= 1024.
    """
    edges = torch.as_tensor(list(bins), dtype=torch.int64)
    if edges.numel() and bool((edges[1:] <= edges[:-1]).any()):
        raise ValueError(f"bins must be strictly increasing, got {list(bins)}")
    return torch.bucketize(response_mask.sum(1).long(), edges, right=True)


def strata_by_pattern_count(texts: Sequence[str], pattern: str = r"<search>", *,
                            max_stratum: int | None = None) -> Tensor:
    """Number of (non-overlapping) regex matches per text, e.g. tool calls: [B] long."""
    rx = re.compile(pattern)
    return _cap(torch.tensor([len(rx.findall(t)) for t in texts], dtype=torch.int64), max_stratum)


def strata_by_tool_calls(scores: Sequence[object], tool: str | None = "search", *,
                         max_stratum: int | None = None) -> Tensor:
    """Calls of ``tool`` per episode from the environment's own count (``EpisodeScore.calls(tool)``): [B] long.

    ``tool=None`` counts turns instead (for environments without tools, e.g. grid puzzles).
    """
    counts = []
    for i, s in enumerate(scores):
        calls = getattr(s, "calls", None)
        if not callable(calls):
            raise ValueError(f"strata_by_tool_calls needs episode scores with tool counts (row {i} has "
                             f"{type(s).__name__}); they come from the multi-turn rollout")
        counts.append(int(getattr(s, "turns", 0)) if tool is None else int(calls(tool)))
    return _cap(torch.tensor(counts, dtype=torch.int64), max_stratum)
