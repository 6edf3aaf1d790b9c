"""Slow loop references for credit/agent.py (see credit/loops/__init__.py)."""

import math

import torch

from creditlab.credit.loops.outcome import loop_grpo


def _standardize(R, rows, eps):
    """(R - mean) / (std + eps) over `rows`; 0 for a single row or a constant set."""
    vals = [R[i] for i in rows]
    if len(vals) < 2 or max(vals) == min(vals):
        return {i: 0.0 for i in rows}
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
    return {i: (R[i] - mu) / (sd + eps) for i in rows}


def loop_stratified(batch, alpha=1.0, eps=1e-6, within_group=True, singleton="zero"):
    R = batch.rewards.double().tolist()
    cells: dict = {}
    for i in range(batch.B):
        key = (int(batch.group_ids[i]), int(batch.strata[i])) if within_group else int(batch.strata[i])
        cells.setdefault(key, []).append(i)
    san = {}
    for rows in cells.values():
        san.update(_standardize(R, rows, eps))
    gn = loop_grpo(batch, eps=eps, singleton=singleton)
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for i in range(batch.B):
        for t in range(batch.T):
            if batch.response_mask[i, t]:
                out[i, t] = alpha * san[i] + (1 - alpha) * gn[i]
    return out


LOOPS = {"stratified": loop_stratified}
