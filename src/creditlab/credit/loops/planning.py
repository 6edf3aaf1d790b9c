"""Slow, obviously-correct loop references for credit/planning.py (hicra, hicra_entropy, ktae, ucas).

Each follows methods.md §5 line by line with Python loops over groups, rows and tokens. `LOOPS` maps an
estimator name to a function (batch, **hyperparams) -> advantages [B,T] float64.
"""

import collections
import functools
import math

import torch

from creditlab.credit.loops.outcome import _groups, loop_grpo


def loop_hicra(batch, alpha=0.2, eps=1e-6, scale_by_std=True, singleton="zero"):
    a = loop_grpo(batch, eps=eps, scale=scale_by_std, singleton=singleton)
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for b in range(batch.B):
        for t in range(batch.T):
            if batch.response_mask[b, t]:
                out[b, t] = a[b] + alpha * abs(a[b]) if batch.planning_mask[b, t] else a[b]
    return out


def _port_threshold(values, k):
    """huggingface/trl hicra_trainer `_topk_threshold`: sorted(values)[int((1 - k) * n)], index clamped."""
    v = sorted(values)
    i = max(0, min(int((1 - k) * len(v)), len(v) - 1))
    return v[i]


def loop_hicra_entropy(batch, alpha=0.2, top_frac=0.3, length_gate=True, eps=1e-6, singleton="zero"):
    a = loop_grpo(batch, eps=eps, singleton=singleton)
    lengths = [int(batch.response_mask[b].sum()) for b in range(batch.B)]
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for rows in _groups(batch).values():
        mean_len = sum(lengths[i] for i in rows) / len(rows)
        for b in rows:
            ents = [float(batch.entropies[b, t]) for t in range(batch.T) if batch.response_mask[b, t]]
            touched = a[b] > 0 and (lengths[b] > mean_len or not length_gate) and ents
            tau = _port_threshold(ents, top_frac) if ents else 0.0
            for t in range(batch.T):
                if batch.response_mask[b, t]:
                    hot = touched and float(batch.entropies[b, t]) > tau
                    out[b, t] = a[b] * (1 + alpha) if hot else a[b]
    return out


@functools.cache
def fisher_p_exact(a, b, c, d):
    """Two-sided Fisher exact p-value of [[a, b], [c, d]] with exact integer arithmetic (math.comb)."""
    r1, c1, n = a + b, a + c, a + b + c + d

    def weight(k):  # pmf(k) * comb(n, r1), an integer
        return math.comb(c1, k) * math.comb(n - c1, r1 - k)

    obs = weight(a)
    ks = range(max(0, r1 + c1 - n), min(r1, c1) + 1)
    return sum(weight(k) for k in ks if weight(k) <= obs) / math.comb(n, r1)


def _h2(p):
    return sum(-x * math.log2(x) for x in (p, 1 - p) if x > 0)


def fisher_p_float32(a, b, c, d, width):
    """The reference's float32 p-value of one table on a grid of `width` columns (KTAE fisher_exact_test)."""
    ta, tb, tc, td = (torch.tensor([float(x)]) for x in (a, b, c, d))
    r1, c1 = ta + tb, ta + tc
    n = r1 + (tc + td)
    k = torch.arange(width, dtype=torch.float32)[None, :]
    on = (k >= torch.clamp(r1 + c1 - n, min=0)[:, None]) & (k <= torch.minimum(r1, c1)[:, None])

    def log_comb(nn, kk):
        return torch.lgamma(nn + 1) - torch.lgamma(kk + 1) - torch.lgamma(nn - kk + 1)

    p_k = torch.exp(log_comb(c1[:, None], k) + log_comb((n - c1)[:, None], r1[:, None] - k)
                    - log_comb(n, r1)[:, None]) * on.float()
    p_obs = torch.exp(log_comb(c1, ta) + log_comb(n - c1, r1 - ta) - log_comb(n, r1))
    return torch.where((p_k <= p_obs[:, None]) & on, p_k, torch.zeros(())).sum(dim=1)[0]


def _ktae_w(a, b, nc, nw, cnt_c, cnt_w, tot_c, tot_w, alpha, beta, gamma_tf, top, k1, bb, tf_eps, width=None):
    c, d = nc - a, nw - b
    if width is None:
        p = fisher_p_exact(a, b, c, d)
        F = 0.0 if p == 1 else math.exp(-2 * p)
    else:
        p32 = fisher_p_float32(a, b, c, d, width)
        F = float(torch.exp(-2 * p32)) if float(p32) != 1.0 else 0.0
    n = nc + nw
    hyx = 0.0
    for x1, x2 in ((a, b), (c, d)):
        if x1 + x2 > 0:
            hyx += (x1 + x2) / n * _h2(x1 / (x1 + x2))
    ig = _h2(nc / n) - hyx
    h = math.asin(math.sqrt(a / nc)) - math.asin(math.sqrt(b / nw))
    avg = (tot_c + tot_w) / 2

    def tf(cnt, tot):
        f = cnt / tot if tot else 0.0
        return f * (k1 + 1) / (f + k1 * (1 - bb + bb * tot / avg))

    tc, tw = tf(cnt_c, tot_c), tf(cnt_w, tot_w)
    x = h + gamma_tf * (tc / (tw + tf_eps) - tw / (tc + tf_eps))
    z = (alpha * F + beta * ig) * x / (alpha + beta)
    sig = 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))
    return 2 * top * (sig - 0.5)


def loop_ktae_weights(batch, alpha=1.0, beta=1.0, gamma_tf=1.0, top=1.0, k1=2.0, b=0.5, tf_eps=1e-5,
                      correct_threshold=0.0, ignore_token_ids=(), zero_last_token=True, reference_float32=False):
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    R = batch.rewards.double().tolist()
    for rows in _groups(batch).values():
        toks = {i: [int(batch.response_ids[i, t]) for t in range(batch.T) if batch.response_mask[i, t]]
                for i in rows}
        corr = [i for i in rows if R[i] > correct_threshold]
        wrong = [i for i in rows if R[i] <= correct_threshold]
        if not corr or not wrong:
            continue
        tot_c, tot_w = sum(len(toks[i]) for i in corr), sum(len(toks[i]) for i in wrong)
        counts = {i: collections.Counter(toks[i]) for i in rows}  # token -> occurrences in row i
        weights = {}
        vocab = {v for i in rows for v in toks[i]}
        present = {v: sum(v in counts[i] for i in rows) for v in vocab}
        width = max(min(present[v], len(corr)) for v in vocab) + 1 if vocab and reference_float32 else None
        for v in vocab:
            if v in ignore_token_ids:
                weights[v] = 0.0
                continue
            a = sum(v in counts[i] for i in corr)
            bw = sum(v in counts[i] for i in wrong)
            cnt_c = sum(counts[i][v] for i in corr)
            cnt_w = sum(counts[i][v] for i in wrong)
            weights[v] = _ktae_w(a, bw, len(corr), len(wrong), cnt_c, cnt_w, tot_c, tot_w,
                                 alpha, beta, gamma_tf, top, k1, b, tf_eps, width)
        for i in rows:
            valid = [t for t in range(batch.T) if batch.response_mask[i, t]]
            for t in valid:
                last = zero_last_token and t == valid[-1]  # the response's EOS (reference: w(EOS id) = 0)
                out[i, t] = 0.0 if last else weights[int(batch.response_ids[i, t])]
    return out


def loop_ktae(batch, eps=1e-6, singleton="zero", **kw):
    a = loop_grpo(batch, eps=eps, singleton=singleton)
    w = loop_ktae_weights(batch, **kw)
    for i in range(batch.B):
        for t in range(batch.T):
            if batch.response_mask[i, t]:
                w[i, t] += a[i]
    return w


def loop_ucas(batch, beta_pos=0.25, beta_neg=0.35, lam=0.05, penalize_zero_signal=True, eps=1e-6,
              singleton="zero"):
    a = loop_grpo(batch, eps=eps, singleton=singleton)
    m = batch.response_mask
    C = [sum(float(batch.certainty[i, t]) for t in range(batch.T) if m[i, t]) for i in range(batch.B)]
    z = [0.0] * batch.B
    for rows in _groups(batch).values():
        vals = [C[i] for i in rows]
        if len(vals) > 1 and max(vals) != min(vals):
            mu = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
            for i in rows:
                z[i] = (C[i] - mu) / (sd + eps)
    logits = [float(batch.token_logits[i, t]) for i in range(batch.B) for t in range(batch.T) if m[i, t]]
    lo, hi = (min(logits), max(logits)) if logits else (0.0, 0.0)
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for i in range(batch.B):
        M = math.exp(-beta_pos * z[i]) if a[i] > 0 else math.exp(beta_neg * z[i])
        for t in range(batch.T):
            if not m[i, t] or (a[i] == 0 and not penalize_zero_signal):
                continue
            ln = (float(batch.token_logits[i, t]) - lo) / (hi - lo) if hi > lo else 0.5
            u = a[i] * M - lam * ln
            out[i, t] = max(u, 0.0) if a[i] * M > 0 else u
    return out


LOOPS = {
    "hicra": loop_hicra,
    "hicra_entropy": loop_hicra_entropy,
    "ktae": loop_ktae,
    "ucas": loop_ucas,
}
