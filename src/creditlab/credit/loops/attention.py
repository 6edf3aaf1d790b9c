"""Slow, obviously-correct loop references for credit/attention.py (attn_local, attn_global, attn_coupled).

Each follows methods.md §5.2 / paper eq. 14-19 with Python loops over rows and tokens. `LOOPS` maps an estimator
name to a function (batch, **hyperparams) -> advantages [B,T] float64.
"""

import math

import torch

from creditlab.credit.loops.outcome import loop_grpo


def _valid(batch, b):
    return [t for t in range(batch.T) if batch.response_mask[b, t]]


def loop_delta(waad_row, cols):
    """Delta at each valid column: |WAAD_t - WAAD_next|, 0 for the last valid token."""
    return {t: abs(float(waad_row[t]) - float(waad_row[cols[i + 1]])) if i + 1 < len(cols) else 0.0
            for i, t in enumerate(cols)}


def loop_top_q(score, cols, q):
    """Selected columns: first floor(q L + 1/2) by (score desc, position asc), only scores > 0."""
    k = math.floor(q * len(cols) + 0.5)
    ranked = sorted(cols, key=lambda t: (-score[t], t))
    return {t for t in ranked[:k] if score[t] > 0}


def _apply(batch, gammas, sign, eps, scale_by_std, singleton):
    a = loop_grpo(batch, eps=eps, scale=scale_by_std, singleton=singleton)
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for b in range(batch.B):
        for t in _valid(batch, b):
            g = gammas[b].get(t, 1.0)
            out[b, t] = a[b] * g if (sign == "both" or a[b] >= 0) else a[b]
    return out


def loop_attn_local(batch, gamma_amp=1.5, q=0.4, sign="both", eps=1e-6, scale_by_std=True, singleton="zero"):
    gammas = []
    for b in range(batch.B):
        cols = _valid(batch, b)
        sel = loop_top_q(loop_delta(batch.attn_waad[b], cols), cols, q)
        gammas.append({t: gamma_amp for t in sel})
    return _apply(batch, gammas, sign, eps, scale_by_std, singleton)


def loop_attn_global(batch, gamma_amp=1.5, q=0.4, sign="both", eps=1e-6, scale_by_std=True, singleton="zero"):
    gammas = []
    for b in range(batch.B):
        cols = _valid(batch, b)
        fai = {t: float(batch.attn_fai[b, t]) for t in cols}
        gammas.append({t: gamma_amp for t in loop_top_q(fai, cols, q)})
    return _apply(batch, gammas, sign, eps, scale_by_std, singleton)


def loop_attn_coupled(batch, gamma_amp=1.5, q=0.4, k=2, alpha=0.5, tau_waad=None, tau_delta=None, sign="both",
                      eps=1e-6, scale_by_std=True, singleton="zero"):
    gammas = []
    bonus = gamma_amp - 1
    for b in range(batch.B):
        cols = _valid(batch, b)
        waad = {t: float(batch.attn_waad[b, t]) for t in cols}
        fai = {t: float(batch.attn_fai[b, t]) for t in cols}
        delta = loop_delta(batch.attn_waad[b], cols)
        t_glob = loop_top_q(fai, cols, q)
        t_loc = loop_top_q(delta, cols, q)
        tw = tau_waad if tau_waad is not None else (sorted(waad.values())[(len(cols) - 1) // 2] if cols else 0.0)
        td = tau_delta if tau_delta is not None else min([delta[t] for t in t_loc], default=math.inf)
        dominated, intros = set(), set()
        for i, t in enumerate(cols):
            window = cols[max(0, i - k):i]
            if t not in t_glob or not window:
                continue
            best = max(delta[u] for u in window)
            if waad[t] <= tw and best >= td:
                dominated.add(t)
                intros.add(next(u for u in window if delta[u] == best))  # earliest argmax
        g = {}
        for t in cols:
            g[t] = (1 + bonus * (t in t_glob and t not in dominated) + (1 - alpha) * bonus * (t in dominated)
                    + alpha * bonus * (t in intros))
        gammas.append(g)
    return _apply(batch, gammas, sign, eps, scale_by_std, singleton)


LOOPS = {"attn_local": loop_attn_local, "attn_global": loop_attn_global, "attn_coupled": loop_attn_coupled}
