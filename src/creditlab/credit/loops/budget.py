"""Slow, obviously-correct loop references for credit/budget.py (brpo, hbpo, vsrm).

brpo follows sail-sg/AnytimeReasoner brpo.py `compute_cot_advantage` loop by loop (b, g, s); hbpo follows the
corrected HBPO `compute_grpo_outcome_advantage`; vsrm places rewards token by token and whitens. `LOOPS` maps an
estimator name to a function (batch, **hyperparams) -> advantages [B,T] float64.
"""

import math

import torch

from creditlab.credit.loops.outcome import _groups


def _valid_cols(batch, b):
    return [t for t in range(batch.T) if batch.response_mask[b, t]]


def _cuts(batch, b):
    return [(int(c), float(s)) for c, s in zip(batch.cut_lens[b].tolist(), batch.cut_scores[b].tolist()) if c >= 0]


def _prior(budgets, prior):
    S = len(budgets)
    if prior == "uniform":
        w = [1.0] * S
    elif prior == "linear":
        w = [float(x) for x in budgets]
    else:
        w = [0.0] * (S - 1) + [1.0]
    tot = sum(w)
    return [x / tot if tot > 0 else 0.0 for x in w]


def loop_brpo(batch, prior="uniform", baseline="brpo", history_base=2.0, singleton="zero"):
    groups = _groups(batch)
    cuts = [_cuts(batch, b) for b in range(batch.B)]
    ret = {}
    for b in range(batch.B):
        budgets = [c for c, _ in cuts[b]]
        p = _prior(budgets, prior)
        r = [s for _, s in cuts[b]]
        ret[b] = [sum(p[j] * r[j] for j in range(s, len(r))) for s in range(len(r))]
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for rows in groups.values():
        for b in rows:
            budgets = [c for c, _ in cuts[b]]
            S = len(budgets)
            p = _prior(budgets, prior)
            r = [s for _, s in cuts[b]]
            adv = []
            for s in range(S):
                peers = [ret[i][s] for i in rows if len(ret[i]) > s]
                v2 = sum(peers) / len(peers) if len(rows) > 1 else 0.0
                v1 = 0.0
                if s > 0:
                    w = [history_base**j for j in range(s)]
                    v1 = sum(w[j] * r[j] for j in range(s)) / sum(w) * sum(p[s:])
                base = {"brpo": (s * v1 + (S - s) * v2) / S, "v1only": v1, "v2only": v2, "none": 0.0}[baseline]
                a = ret[b][s] - base
                adv.append(0.0 if (len(rows) == 1 and singleton == "zero") else a)
            for i, t in enumerate(_valid_cols(batch, b)):
                if S == 0:
                    continue
                seg = min(sum(1 for c in budgets if c <= i), S - 1)
                out[b, t] = adv[seg]
    return out


def loop_hbpo(batch, beta=4.0, l_max=4096, alpha=None, piecewise=False, eps=1e-6, singleton="zero"):
    alpha = 1.0 / l_max if alpha is None else alpha
    R = []
    for b in range(batch.B):
        L = len(_valid_cols(batch, b))
        bud = int(batch.think_budget[b])
        if bool(batch.correct[b]) and L <= l_max:
            f1 = beta * math.cos(math.pi * L / (2 * l_max)) - alpha * abs(bud - L)
            f2 = beta * math.cos(math.pi * bud / (2 * l_max))
            R.append((f1 if L > bud else f2) if piecewise else min(f1, f2))
        elif bool(batch.correct[b]):
            R.append(0.0)
        else:
            R.append(float(batch.rewards[b]))
    a = [0.0] * batch.B
    for rows in _groups(batch).values():
        n = len(rows)
        vals = [R[i] for i in rows]
        mu = sum(vals) / n
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        for i in rows:
            if n == 1:
                a[i] = R[i] if singleton == "raw" else 0.0
                continue
            z = 0.0 if max(vals) == min(vals) else (R[i] - mu) / (sd + eps)
            bud = int(batch.think_budget[i])
            sub = [R[j] for j in rows if int(batch.think_budget[j]) == bud]
            a[i] = z + sum(sub) / len(sub) - beta * math.cos(math.pi * bud / (2 * l_max))
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for b in range(batch.B):
        for t in _valid_cols(batch, b):
            out[b, t] = a[b]
    return out


def loop_vsrm(batch, step_coef=1.0, gamma=1.0, lookahead=0, lookahead_decay=0.5, whiten=True, eps=1e-8):
    returns = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for b in range(batch.B):
        cols = _valid_cols(batch, b)
        cuts = _cuts(batch, b)
        d = [0.0] + [cuts[k][1] - cuts[k - 1][1] for k in range(1, len(cuts))]
        if lookahead > 0:
            d2 = list(d)
            for k in range(1, len(d)):
                if d[k] == 0:
                    for j in range(k + 1, min(k + min(lookahead, len(d)), len(d) - 1) + 1):
                        if d[j] != 0:
                            d2[k] = lookahead_decay ** (j - k) * d[j]
                            break
            d = d2
        r = [0.0] * len(cols)
        for k in range(1, len(cuts)):
            pos = min(cuts[k][0], len(cols)) - 1
            if pos >= 0:
                r[pos] += step_coef * d[k]
        if cols:
            r[-1] += float(batch.rewards[b])
        acc = 0.0
        for i in range(len(cols) - 1, -1, -1):
            acc = r[i] + gamma * acc
            returns[b, cols[i]] = acc
    if not whiten:
        return returns
    vals = [float(returns[b, t]) for b in range(batch.B) for t in _valid_cols(batch, b)]
    out = torch.zeros_like(returns)
    if not vals:
        return out
    mu = sum(vals) / len(vals)
    var = sum((v - mu) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
    for b in range(batch.B):
        for t in _valid_cols(batch, b):
            out[b, t] = (float(returns[b, t]) - mu) / math.sqrt(var + eps)
    return out


LOOPS = {"brpo": loop_brpo, "hbpo": loop_hbpo, "vsrm": loop_vsrm}
