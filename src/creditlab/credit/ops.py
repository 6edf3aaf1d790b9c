"""Shared vectorized primitives for estimators (methods.md §2). Implemented once, tested once.

Nothing here loops over responses or tokens in Python; the only Python loop is over fixed-size chunks of
the time axis in `discounted_reverse_cumsum` (T/64 iterations), which keeps the scan numerically stable.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Singleton = Literal["zero", "raw"]


def group_index(group_ids: Tensor) -> tuple[Tensor, int]:
    """Dense group index 0..n_groups-1 for each row ([B] long) and the number of groups."""
    uniq, inverse = torch.unique(group_ids, return_inverse=True)
    return inverse, int(uniq.numel())


def group_sum(values: Tensor, index: Tensor, n_groups: int) -> Tensor:
    """Per-group sum of `values` [B] -> [n_groups] (float64 accumulation for exactness)."""
    out = torch.zeros(n_groups, dtype=torch.float64, device=values.device)
    return out.index_add_(0, index, values.to(torch.float64))


def group_stats(values: Tensor, group_ids: Tensor, *, unbiased: bool = True) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row statistics of the row's group, computed in float64.

    Returns (mean [B], std [B], count [B], constant [B] bool). `std` is 0 for singleton groups (the
    unbiased estimator is undefined there; callers apply their singleton policy using `count`), and
    `constant` is True where every member of the group has exactly the same value.
    """
    index, n = group_index(group_ids)
    v = values.to(torch.float64)
    count = torch.zeros(n, dtype=torch.float64, device=v.device).index_add_(0, index, torch.ones_like(v))
    mean = group_sum(v, index, n) / count
    dev2 = group_sum((v - mean[index]) ** 2, index, n)  # two-pass: exact for constant groups
    denom = (count - 1).clamp_min(1) if unbiased else count
    var = torch.where(count > 1, dev2 / denom, torch.zeros_like(dev2))
    vmax = torch.full((n,), -torch.inf, dtype=torch.float64, device=v.device).scatter_reduce(0, index, v, "amax")
    vmin = torch.full((n,), torch.inf, dtype=torch.float64, device=v.device).scatter_reduce(0, index, v, "amin")
    return mean[index], var.sqrt()[index], count[index], (vmax == vmin)[index]


def broadcast(row_values: Tensor, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Write a per-row scalar [B] on every valid token: [B] -> [B,T], 0 outside `mask`."""
    return torch.where(mask, row_values.to(dtype)[:, None], torch.zeros((), dtype=dtype, device=mask.device))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over entries where `mask` is True (0 when there are none)."""
    n = mask.sum()
    return torch.where(n > 0, (x * mask).sum() / n.clamp_min(1), torch.zeros((), dtype=x.dtype, device=x.device))


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with the mean and *unbiased* variance over all masked entries of the batch.

    0 outside `mask`. With fewer than two valid entries the variance is taken as 0 (documented, finite),
    so a lone token is centred to 0; with no valid entries the result is all zeros.
    """
    m = mask.to(torch.bool)
    x64 = x.to(torch.float64)
    n = m.sum()
    mean = masked_mean(x64, m)
    var = torch.where(n > 1, (((x64 - mean) ** 2) * m).sum() / (n - 1).clamp_min(1), torch.zeros_like(mean))
    out = (x64 - mean) if shift_mean else x64
    out = out * torch.rsqrt(var + eps)
    return torch.where(m, out, torch.zeros_like(out)).to(x.dtype)


def discounted_reverse_cumsum(x: Tensor, discount: float, chunk: int = 64) -> Tensor:
    """y_t = sum_{k >= t} discount^(k - t) x_k along the last axis of `x` [B,T], no masking.

    Vectorized within chunks of `chunk` tokens by a small triangular matrix product and carried across
    chunks in a loop over T/chunk blocks. Exact (up to float rounding) for any discount in [0, 1].
    """
    if not 0.0 <= discount <= 1.0:
        raise ValueError(f"discount must be in [0, 1], got {discount}")
    if discount == 1.0:
        return x.flip(-1).cumsum(-1).flip(-1)
    b, t = x.shape
    n_chunks = -(-t // chunk)
    pad = n_chunks * chunk - t
    xp = torch.nn.functional.pad(x.to(torch.float64), (0, pad)).view(b, n_chunks, chunk)  # [B, C, K]
    i = torch.arange(chunk, device=x.device)
    expo = (i[None, :] - i[:, None]).to(torch.float64)  # [K, K]: j - i
    tri = torch.where(expo >= 0, discount ** expo.clamp_min(0), torch.zeros_like(expo))
    local = xp @ tri.T  # [B, C, K]: within-chunk discounted sums
    tail_w = discount ** (chunk - i).to(torch.float64)  # weight of the next chunk's start value
    out = torch.empty_like(local)
    carry = torch.zeros(b, dtype=torch.float64, device=x.device)  # full value at the start of chunk c+1
    for c in range(n_chunks - 1, -1, -1):
        out[:, c] = local[:, c] + tail_w[None, :] * carry[:, None]
        carry = out[:, c, 0]
    return out.view(b, -1)[:, :t].to(x.dtype)


def compact_left(mask: Tensor) -> tuple[Tensor, Tensor]:
    """Permutation that moves each row's valid tokens to the front, keeping their order.

    Returns (order [B,T], compact_mask [B,T]) where `x.gather(1, order)` is x compacted and
    `compact_mask[b, :L_b]` is True. Scatter back with `y.scatter(1, order, yc)`.
    """
    t = mask.shape[1]
    pos = torch.arange(t, device=mask.device).expand_as(mask)
    key = torch.where(mask, pos, pos + t)  # valid tokens first, in order
    order = key.argsort(dim=1, stable=True)
    lengths = mask.sum(1, keepdim=True)
    compact_mask = pos < lengths
    return order, compact_mask


def segment_broadcast(seg_values: Tensor, seg_ids: Tensor) -> Tensor:
    """Write per-segment scalars [B,S] on their tokens: seg_ids [B,T] in 0..S-1, -1 -> 0."""
    valid = seg_ids >= 0
    if seg_values.shape[1] == 0:
        return torch.zeros(seg_ids.shape, dtype=seg_values.dtype, device=seg_ids.device)
    gathered = seg_values.gather(1, seg_ids.clamp_min(0))
    return torch.where(valid, gathered, torch.zeros_like(gathered))
