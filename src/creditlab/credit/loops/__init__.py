"""Slow loop references, one module per estimator family, merged into `LOOPS` (name -> fn(batch, **kw) -> [B,T]).

Tests check every vectorized estimator against these; `creditlab speed` times both in one process.
"""

from collections.abc import Callable

from creditlab.credit.loops import agent, attention, budget, macro, outcome, planning, process, segment, tree

LOOPS: dict[str, Callable] = {}
for _module in (outcome, tree, planning, agent, process, segment, macro, attention, budget):
    LOOPS.update(_module.LOOPS)
