"""Slow, obviously-correct loop references for the outcome estimators (used by tests and `creditlab speed`).

Each `loop_*` follows the formula in methods.md line by line with Python loops over groups, rows and tokens.
`LOOPS` maps an estimator name to a function (batch, **hyperparams) -> advantages [B,T] float64.
"""

import math

import torch


def _groups(batch):
    out: dict[int, list[int]] = {}
    for i, g in enumerate(batch.group_ids.tolist()):
        out.setdefault(g, []).append(i)
    return out


def loop_grpo(batch, eps=1e-6, scale=True, singleton="zero"):
    a = [0.0] * batch.B
    R = batch.rewards.double().tolist()
    for rows in _groups(batch).values():
        vals = [R[i] for i in rows]
        n = len(vals)
        mu = sum(vals) / n
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0
        for i in rows:
            if n == 1:
                a[i] = R[i] if singleton == "raw" else 0.0
            elif max(vals) == min(vals):
                a[i] = 0.0
            else:
                a[i] = (R[i] - mu) / (sd + eps) if scale else R[i] - mu
    return a


def loop_rloo(batch, singleton="zero"):
    a = [0.0] * batch.B
    R = batch.rewards.double().tolist()
    for rows in _groups(batch).values():
        for i in rows:
            others = [R[j] for j in rows if j != i]
            if not others:
                a[i] = R[i] if singleton == "raw" else 0.0
            else:
                a[i] = R[i] - sum(others) / len(others)
    return a


def to_tokens(a, batch):
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for b in range(batch.B):
        for t in range(batch.T):
            if batch.response_mask[b, t]:
                out[b, t] = a[b]
    return out


def loop_gae(batch, gamma, lam):
    B, T = batch.response_ids.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    r, V, m = batch.token_rewards.double(), batch.values.double(), batch.response_mask
    for b in range(B):
        next_v, g_next = 0.0, 0.0
        for t in reversed(range(T)):
            if not m[b, t]:
                continue
            delta = float(r[b, t]) + gamma * next_v - float(V[b, t])
            g = delta + gamma * lam * g_next
            adv[b, t], ret[b, t] = g, g + float(V[b, t])
            next_v, g_next = float(V[b, t]), g
    return adv, ret


def loop_whiten(x, mask):
    vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    n = len(vals)
    mu = sum(vals) / n if n else 0.0
    var = sum((v - mu) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
    out = torch.zeros_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                out[b, t] = (float(x[b, t]) - mu) / math.sqrt(var + 1e-8)
    return out




def _grpo(batch, **kw):
    return to_tokens(loop_grpo(batch, eps=kw.get("eps", 1e-6), scale=kw.get("scale_by_std", True),
                               singleton=kw.get("singleton", "zero")), batch)


LOOPS = {
    "grpo": _grpo,
    "dr_grpo": lambda batch, **kw: to_tokens(loop_grpo(batch, scale=False, singleton=kw.get("singleton", "zero")),
                                              batch),
    "rloo": lambda batch, **kw: to_tokens(loop_rloo(batch, kw.get("singleton", "zero")), batch),
    "reinforce_pp": lambda batch, **kw: loop_whiten(to_tokens(loop_grpo(batch, scale=False), batch),
                                                    batch.response_mask),
    "gae": lambda batch, **kw: loop_whiten(loop_gae(batch, kw.get("gamma", 1.0), kw.get("lam", 1.0))[0],
                                           batch.response_mask),
}
