"""Attention preplan/anchor credit: attn_local, attn_global, attn_coupled (methods.md §5.2).

Paper: "Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained Policy
Optimization" (Li et al., arXiv 2510.13554; read in its v1 text and in the later ICML 2026 text, §5.2 eq. 13-19 and
§5.3.1). No public code (the authors built it on alibaba/ROLL and have not released it).

All three start from GRPO's per-response advantage a_b (`outcome.group_advantage`), broadcast to tokens, and
multiply it by a per-token factor gamma_t >= 1 computed from the attention signals of `creditlab.signals.attention`:
- attn_waad [B,T]: WAAD_t = sum_s Abar_loc[t,s] min(t - s, W)         (local heads, paper Def. 4.1)
- attn_fai  [B,T]: FAI_s  = mean over t in [s + H_lo, s + H_hi] of Abar_glob[t,s]   (global heads, Def. 4.2)
W, H_lo, H_hi and the head sets belong to the signal (`--attn-window`, `--attn-horizon-lo/-hi`, `--attn-head-frac`).

Selection rule shared by every strategy (`top_q_mask`): per response, rank the valid tokens by score (descending,
ties -> earlier position), keep the first k_b = floor(q L_b + 1/2) whose score is > 0. A score of exactly 0 means
"undefined" (FAI of the last H_lo tokens, whose horizon holds no row; Delta of the last token), so such tokens are
never selected: with distinct positive scores exactly round(q L_b) tokens are selected.

Every mask and factor is computed under no-grad (the registry runs estimators under `torch.no_grad()`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.credit.ops import Singleton, broadcast, compact_left
from creditlab.credit.outcome import group_advantage
from creditlab.registry import estimator

Sign = Literal["both", "nonnegative"]
_F64 = torch.float64


# ------------------------------------------------------------------------------------------ shared primitives
def _compaction(mask: Tensor) -> tuple[Tensor | None, Tensor]:
    """(order or None, compact mask): None when the valid tokens already form a prefix of each row (the usual
    case), so callers skip the gather/scatter; else `ops.compact_left`."""
    prefix = torch.arange(mask.shape[1], device=mask.device)[None, :] < mask.sum(1, keepdim=True)
    if torch.equal(prefix, mask):
        return None, prefix
    return compact_left(mask)


def _gather(x: Tensor, order: Tensor | None) -> Tensor:
    return x if order is None else x.gather(1, order)


def _scatter(x: Tensor, order: Tensor | None) -> Tensor:
    return x if order is None else torch.zeros_like(x).scatter(1, order, x)


def waad_delta(waad: Tensor, mask: Tensor) -> Tensor:
    """Delta_t = |WAAD_t - WAAD_{t+1}| between consecutive valid tokens (paper eq. 14); [B,T] float64.

    The token *before* the jump carries it (the paper's formula marks t, not t + 1). The last valid token of a row
    has no successor: its Delta is 0 (undefined, never selected). 0 outside `mask`.
    """
    order, cmask = _compaction(mask)  # valid tokens first, in order
    w = _gather(waad.to(_F64), order)  # [B,T] compacted
    nxt = torch.cat([w[:, 1:], torch.zeros_like(w[:, :1])], dim=1)
    has_next = torch.cat([cmask[:, 1:], torch.zeros_like(cmask[:, :1])], dim=1)
    d = torch.where(cmask & has_next, (w - nxt).abs(), torch.zeros_like(w))
    return _scatter(d, order)


def top_q_mask(score: Tensor, mask: Tensor, q: float) -> Tensor:
    """Per-row top-q selection [B,T] bool: the first floor(q L_b + 1/2) valid tokens by score (ties -> earlier
    position), restricted to score > 0 (0 = undefined). Deterministic."""
    s = torch.where(mask, score.to(_F64), torch.full_like(score, -torch.inf, dtype=_F64))
    order = torch.argsort(s, dim=1, descending=True, stable=True)  # [B,T] stable: ties keep position order
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    k = torch.floor(q * mask.sum(1).to(_F64) + 0.5).long()  # [B]
    return mask & (rank < k[:, None]) & (score.to(_F64) > 0)


def _window_max(delta: Tensor, mask: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """For each valid token t: max of Delta over the k valid tokens before it and the column of that argmax
    (earliest on ties). Returns (max [B,T] float64, -inf where the window is empty; arg [B,T] long)."""
    order, cmask = _compaction(mask)
    d = torch.where(cmask, _gather(delta.to(_F64), order), torch.full_like(delta, -torch.inf, dtype=_F64))
    T = d.shape[1]
    best = torch.full_like(d, -torch.inf)
    pos = torch.arange(T, device=d.device).expand(d.shape)
    best_pos = torch.zeros_like(pos)  # compacted index of the argmax
    for j in range(min(k, T), 0, -1):  # earliest offset first, so ">" keeps the earliest position on ties
        shifted = torch.cat([torch.full_like(d[:, :j], -torch.inf), d[:, :-j]], dim=1) if j < T \
            else torch.full_like(d, -torch.inf)
        better = shifted > best
        best = torch.where(better, shifted, best)
        best_pos = torch.where(better, pos - j, best_pos)
    best = torch.where(cmask, best, torch.full_like(best, -torch.inf))
    if order is None:
        return best, best_pos.clamp_min(0)
    arg_col = order.gather(1, best_pos.clamp_min(0))  # back to original columns
    out_best = torch.full_like(best, -torch.inf).scatter(1, order, best)
    out_arg = torch.zeros_like(order).scatter(1, order, arg_col)
    return out_best, out_arg


def _row_median(x: Tensor, mask: Tensor) -> Tensor:
    """Lower median of each row's valid entries [B] (torch.median convention); 0 for an empty row."""
    big = torch.finfo(_F64).max
    xs = torch.where(mask, x.to(_F64), big).sort(dim=1).values
    n = mask.sum(1)
    idx = ((n - 1).clamp_min(0) // 2)[:, None]
    return torch.where(n > 0, xs.gather(1, idx)[:, 0], torch.zeros(len(n), dtype=_F64, device=x.device))


def _check(gamma_amp: float, q: float, sign: str) -> None:
    if not gamma_amp > 0:
        raise ValueError(f"gamma_amp must be > 0 (1.5 in the paper; 1 leaves GRPO unchanged), got {gamma_amp}")
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1] (the share of each response's tokens selected), got {q}")
    if sign not in ("both", "nonnegative"):
        raise ValueError(f"sign must be 'both' or 'nonnegative', got {sign!r}")


def _shaped(batch: RolloutBatch, gamma: Tensor, selected: Tensor, sign: str, *, eps: float, scale_by_std: bool,
            singleton: Singleton, **extra: float) -> Credit:
    """A = gamma * a_b on tokens (all of them, or only where a_b >= 0), with the selection diagnostics."""
    mask = batch.response_mask
    a = group_advantage(batch.rewards, batch.group_ids, scale_by_std=scale_by_std, eps=eps, singleton=singleton)
    base = broadcast(a, mask, _F64)  # [B,T]
    scale = gamma if sign == "both" else torch.where(base >= 0, gamma, torch.ones_like(gamma))
    adv = torch.where(mask, base * scale, torch.zeros((), dtype=_F64)).to(torch.float32)
    sel = selected & mask
    n_valid, n_sel = max(int(mask.sum()), 1), int(sel.sum())
    punct = batch.punct_mask & mask
    metrics = advantage_metrics(
        adv, mask, shaped_frac=float(((gamma != 1) & mask).sum()) / n_valid,
        **{"attn_selected_frac": n_sel / n_valid,
           "attn_selected_punct_frac": float((sel & punct).sum()) / max(n_sel, 1),
           "attn_punct_frac": float(punct.sum()) / n_valid, **extra})
    return Credit(advantages=adv, metrics=metrics)


def _indicator_gamma(selected: Tensor, gamma_amp: float) -> Tensor:
    return 1.0 + (gamma_amp - 1.0) * selected.to(_F64)  # [B,T]


# ------------------------------------------------------------------------------------------ the three strategies
@estimator("attn_local", needs=("attn_waad", "punct_mask"),
           ranges={"gamma_amp": "(0, inf)", "q": "(0, 1]", "eps": "[0, inf)"})
def attn_local(batch: RolloutBatch, *, gamma_amp: float = 1.5, q: float = 0.4, sign: Sign = "both",
               eps: float = 1e-6, scale_by_std: bool = True, singleton: Singleton = "zero") -> Credit:
    """Local-chunk credit: amplify preplan tokens, the top-q tokens by WAAD jump Delta_t (paper eq. 14-15).

    Paper: arXiv 2510.13554 §5.2 strategy (1). No reference code exists.
    Shapes: rewards [B], group_ids [B], attn_waad [B,T], punct_mask [B,T] -> advantages [B,T].
    Formula: Delta_t = |WAAD_t - WAAD_{t+1}| (consecutive valid tokens); T_loc = top_q_mask(Delta, q);
    gamma_t = 1 + (gamma_amp - 1) 1[t in T_loc]; A_t = gamma_t a_b (a_b = GRPO advantage).
    Defaults (paper): gamma_amp = 1.5, q = 0.4; W = 10 lives in the signal (--attn-window).
    sign: "both" scales the signed advantage (the ICML text: "applied to the signed per-token advantages,
    covering both positive and negative advantages", Table 7a, same main-table numbers as v1); "nonnegative"
    scales only A >= 0 (the v1 text: "applied only to nonnegative advantages").
    Deviations (library choices): selection count floor(q L + 1/2) per response, ties -> earlier token, score 0
    (the last token's undefined Delta) never selected. Metrics credit/attn_selected_punct_frac vs
    credit/attn_punct_frac show whether selection piles onto punctuation.
    """
    _check(gamma_amp, q, sign)
    mask = batch.response_mask
    sel = top_q_mask(waad_delta(batch.attn_waad, mask), mask, q)
    return _shaped(batch, _indicator_gamma(sel, gamma_amp), sel, sign, eps=eps, scale_by_std=scale_by_std,
                   singleton=singleton)


@estimator("attn_global", needs=("attn_fai", "punct_mask"),
           ranges={"gamma_amp": "(0, inf)", "q": "(0, 1]", "eps": "[0, inf)"})
def attn_global(batch: RolloutBatch, *, gamma_amp: float = 1.5, q: float = 0.4, sign: Sign = "both",
                eps: float = 1e-6, scale_by_std: bool = True, singleton: Singleton = "zero") -> Credit:
    """Global-anchor credit: amplify anchor tokens, the top-q tokens by future attention influence (eq. 16-17).

    Paper: arXiv 2510.13554 §5.2 strategy (2). No reference code exists.
    Shapes: rewards [B], group_ids [B], attn_fai [B,T], punct_mask [B,T] -> advantages [B,T].
    Formula: T_glob = top_q_mask(FAI, q); gamma_t = 1 + (gamma_amp - 1) 1[t in T_glob]; A_t = gamma_t a_b.
    Defaults (paper): gamma_amp = 1.5, q = 0.4; the horizon H = [10, 100] (ICML text; v1: [10, 50]) lives in the
    signal (--attn-horizon-lo/-hi). sign: see `attn_local` ("both" default, "nonnegative" = v1 text).
    Deviations: as `attn_local`; FAI of a token whose horizon holds no response row (the last H_lo tokens) is 0
    and never selected. The signal drops attention-sink columns by default (--attn-sink, a library choice).
    """
    _check(gamma_amp, q, sign)
    sel = top_q_mask(batch.attn_fai, batch.response_mask, q)
    return _shaped(batch, _indicator_gamma(sel, gamma_amp), sel, sign, eps=eps, scale_by_std=scale_by_std,
                   singleton=singleton)


def coupled_gamma(waad: Tensor, fai: Tensor, mask: Tensor, *, gamma_amp: float, q: float, k: int, alpha: float,
                  tau_waad: float | None, tau_delta: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """gamma [B,T] of the coupled strategy (eq. 18-19), the selected tokens T_glob | I(D), D and T_glob."""
    delta = waad_delta(waad, mask)  # [B,T]
    t_glob = top_q_mask(fai, mask, q)
    t_loc = top_q_mask(delta, mask, q)
    tw = _row_median(waad, mask) if tau_waad is None else torch.full((mask.shape[0],), float(tau_waad), dtype=_F64)
    if tau_delta is None:  # the T_loc cut-off: the smallest Delta among T_loc (no T_loc -> nothing is dominated)
        td = torch.where(t_loc, delta, torch.full_like(delta, torch.inf)).min(dim=1).values
    else:
        td = torch.full((mask.shape[0],), float(tau_delta), dtype=_F64)
    win_max, intro = _window_max(delta, mask, k)  # [B,T], [B,T]
    dominated = t_glob & (waad.to(_F64) <= tw[:, None]) & (win_max >= td[:, None]) & torch.isfinite(win_max)
    hits = torch.zeros_like(intro).scatter_add(1, intro, dominated.long())  # [B,T] dominated anchors per intro
    intro_mask = (hits > 0) & mask
    bonus = gamma_amp - 1.0
    gamma = (1.0 + bonus * (t_glob & ~dominated).to(_F64) + (1 - alpha) * bonus * dominated.to(_F64)
             + alpha * bonus * intro_mask.to(_F64))
    return gamma, t_glob | intro_mask, dominated, t_glob


@estimator("attn_coupled", needs=("attn_waad", "attn_fai", "punct_mask"),
           ranges={"gamma_amp": "(0, inf)", "q": "(0, 1]", "k": "[1, inf)", "alpha": "[0, 1]", "tau_waad": "[0, inf)",
                   "tau_delta": "[0, inf)", "eps": "[0, inf)"})
def attn_coupled(batch: RolloutBatch, *, gamma_amp: float = 1.5, q: float = 0.4, k: int = 2, alpha: float = 0.5,
                 tau_waad: float | None = None, tau_delta: float | None = None, sign: Sign = "both",
                 eps: float = 1e-6, scale_by_std: bool = True, singleton: Singleton = "zero") -> Credit:
    """Coupled rhythm credit: anchors, with part of a locally dominated anchor's bonus moved to its preplan token.

    Paper: arXiv 2510.13554 §5.2 strategy (3), eq. 18-19. No reference code exists.
    Shapes: attn_waad [B,T], attn_fai [B,T], punct_mask [B,T] -> advantages [B,T].
    Formula: T_glob = top_q_mask(FAI, q); anchor t is locally dominated (t in D) iff WAAD_t <= tau_waad and
    max_{u in t-k..t-1} Delta_u >= tau_delta; intro(t) = argmax_{u in t-k..t-1} Delta_u (earliest on ties);
    gamma_t = 1 + (gamma_amp-1)[1(t in T_glob \\ D) + (1-alpha) 1(t in D) + alpha 1(t in I(D))]; A_t = gamma_t a_b.
    Defaults: gamma_amp = 1.5, q = 0.4 (paper); k = 2 (paper: k in {1,2,3}; the middle value is a library choice).
    Library choices for what the paper leaves unstated: tau_waad = the response's (lower) median WAAD,
    tau_delta = the local-chunk cut-off (smallest Delta among the top-q Delta tokens), alpha = 0.5; intro(t) as the
    argmax of Delta in the window is reconstructed from "the preplan token that prepares the anchor". Windows count
    valid tokens of the same response only. sign: see `attn_local`.
    Metric credit/attn_dominated_frac = |D| / |T_glob|.
    """
    _check(gamma_amp, q, sign)
    if k < 1:
        raise ValueError(f"k must be >= 1 (the look-back for a preceding WAAD jump; paper: 1, 2 or 3), got {k}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (share of a dominated anchor's bonus moved back), got {alpha}")
    mask = batch.response_mask
    gamma, selected, dominated, t_glob = coupled_gamma(batch.attn_waad, batch.attn_fai, mask, gamma_amp=gamma_amp,
                                                       q=q, k=k, alpha=alpha, tau_waad=tau_waad, tau_delta=tau_delta)
    n_glob = int(t_glob.sum())
    return _shaped(batch, gamma, selected, sign, eps=eps, scale_by_std=scale_by_std, singleton=singleton,
                   **{"attn_dominated_frac": float(dominated.sum()) / max(n_glob, 1)})
