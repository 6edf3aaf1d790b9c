"""Slow loop references for credit/process.py (see credit/loops/__init__.py).

Each function follows the docstring formula of its estimator with plain Python loops over groups, rows, steps
and tokens. `LOOPS` maps an estimator name to fn(batch, **hyperparams) -> advantages [B,T] float64.
"""

import math

import torch


def _groups(batch):
    out: dict[int, list[int]] = {}
    for i, g in enumerate(batch.group_ids.tolist()):
        out.setdefault(g, []).append(i)
    return out


def _group_of(batch):
    return {i: rows for rows in _groups(batch).values() for i in rows}


def steps_of(batch, b):
    """Sorted valid step indices of row b and their token counts."""
    lens: dict[int, int] = {}
    for t in range(batch.T):
        k = int(batch.step_ids[b, t])
        if k >= 0:
            lens[k] = lens.get(k, 0) + 1
    ks = sorted(lens)
    return ks, [lens[k] for k in ks]


def loop_rloo(values, rows, i, singleton):
    others = [values[j] for j in rows if j != i]
    if not others:
        return values[i] if singleton == "raw" else 0.0
    if max(values[j] for j in rows) == min(values[j] for j in rows):
        return 0.0
    return values[i] - sum(others) / len(others)


def _tokens(batch, b, step_value, outside):
    """Row b's token values: step_value[k] on tokens of step k, `outside` on valid tokens with step_id -1."""
    row = [0.0] * batch.T
    for t in range(batch.T):
        if batch.response_mask[b, t]:
            k = int(batch.step_ids[b, t])
            row[t] = step_value[k] + outside if k >= 0 else outside
    return row


def loop_sum_returns(rho, gamma=1.0):
    out, acc = [0.0] * len(rho), 0.0
    for i in reversed(range(len(rho))):
        acc = rho[i] + gamma * acc
        out[i] = acc
    return out


def loop_softmin(rho, temperature):
    if not rho:
        return []
    z = [-r / temperature for r in rho]
    zmax = max(z)
    e = [math.exp(v - zmax) for v in z]
    return [ei / sum(e) * r for ei, r in zip(e, rho)]


def loop_sum_form(batch, gamma=1.0, baseline="token", mean_form=False, vr_coef=1.0, singleton="zero", rho_fn=None):
    B = batch.B
    group = _group_of(batch)
    info = []
    for b in range(B):
        ks, lens = steps_of(batch, b)
        rho = [float(batch.step_rewards[b, k]) for k in ks]
        if mean_form:
            rho = [r / len(rho) for r in rho]
        info.append((ks, lens, rho_fn(rho) if rho_fn else rho))
    total = [sum(rho) for _, _, rho in info]
    length = [int(batch.response_mask[b].sum()) for b in range(B)]  # response tokens, separators included
    rate = []
    for ks, lens, rho in info:
        units = lens if baseline == "token_per_row" else [1] * len(ks)
        rate.append(sum(rho) / sum(units) if units else 0.0)
    v = [float(r) - 1.0 for r in batch.rewards.double().tolist()]
    out = torch.zeros(B, batch.T, dtype=torch.float64)
    for b in range(B):
        ks, lens, rho = info[b]
        others = [j for j in group[b] if j != b]
        if baseline != "none":
            if not others and singleton == "zero":
                continue
            if baseline == "token":  # PURE: ratio of sums over the other responses, times the step's tokens
                den = sum(length[j] for j in others)
                base = sum(total[j] for j in others) / den if den else 0.0
            else:  # mean over the others of their per-token (per-step) rate
                base = sum(rate[j] for j in others) / len(others) if others else 0.0
            units = [1] * len(ks) if baseline == "step" else lens
            rho = [r - base * u for r, u in zip(rho, units)]
            outcome = vr_coef * loop_rloo(v, group[b], b, singleton)
        else:
            outcome = vr_coef * v[b]
        g = dict(zip(ks, loop_sum_returns(rho, gamma)))
        out[b] = torch.tensor(_tokens(batch, b, g, outcome), dtype=torch.float64)
    return out


def loop_pure(batch, mode="softmin", temperature=0.1, baseline="rloo", vr_coef=1.0, singleton="zero"):
    if mode == "softmin":
        return loop_sum_form(batch, 1.0, "token" if baseline == "rloo" else "none", False, vr_coef, singleton,
                             rho_fn=lambda rho: loop_softmin(rho, temperature))
    B = batch.B
    group = _group_of(batch)
    info = []
    for b in range(B):
        ks, _ = steps_of(batch, b)
        rho = [float(batch.step_rewards[b, k]) for k in ks]
        info.append((ks, [min(rho[i:]) for i in range(len(rho))]))
    score = [g[0] if g else 0.0 for _, g in info]
    v = [float(r) - 1.0 for r in batch.rewards.double().tolist()]
    out = torch.zeros(B, batch.T, dtype=torch.float64)
    for b in range(B):
        ks, g = info[b]
        others = [j for j in group[b] if j != b]
        if baseline == "none":
            outcome = vr_coef * v[b]
        else:
            if not others and singleton == "zero":
                continue
            base = sum(score[j] for j in others) / len(others) if others else 0.0
            g = [x - base for x in g]
            outcome = vr_coef * loop_rloo(v, group[b], b, singleton)
        out[b] = torch.tensor(_tokens(batch, b, dict(zip(ks, g)), outcome), dtype=torch.float64)
    return out


def loop_capo(batch, w_whole=2.0, w_process=1.0, flag_threshold=0.5, eps=1e-6, singleton="zero"):
    B, T = batch.B, batch.T
    r = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            if batch.response_mask[b, t]:
                k = int(batch.step_ids[b, t])
                flagged = k >= 0 and float(batch.step_rewards[b, k]) < flag_threshold
                r[b][t] = float(batch.rewards[b]) * w_whole - (w_process if flagged else 0.0)
    return _standardize_tokens(batch, r, eps, singleton)


def _standardize_tokens(batch, r, eps, singleton):
    out = torch.zeros(batch.B, batch.T, dtype=torch.float64)
    for rows in _groups(batch).values():
        vals = [r[b][t] for b in rows for t in range(batch.T) if batch.response_mask[b, t]]
        n = len(vals)
        mu = sum(vals) / n if n else 0.0
        sd = math.sqrt(sum((x - mu) ** 2 for x in vals) / (n - 1)) if n > 1 else 0.0
        for b in rows:
            for t in range(batch.T):
                if not batch.response_mask[b, t]:
                    continue
                if len(rows) == 1:
                    out[b, t] = r[b][t] if singleton == "raw" else 0.0
                elif max(vals) == min(vals):
                    out[b, t] = 0.0
                else:
                    out[b, t] = (r[b][t] - mu) / (sd + eps)
    return out


def loop_whiten(x, mask):
    vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    n = len(vals)
    mu = sum(vals) / n if n else 0.0
    var = sum((v - mu) ** 2 for v in vals) / (n - 1) if n > 1 else 0.0
    out = torch.zeros(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                out[b, t] = (float(x[b, t]) - mu) / math.sqrt(var + 1e-8)
    return out


def loop_prime(batch, beta=0.05, dpo_coef=5.0, gt_coef=5.0, granularity="token", clean_loo=False,
               prm_norm="batch_norm", singleton="zero", return_returns=False):
    B, T = batch.B, batch.T
    m = batch.response_mask
    valid = [[t for t in range(T) if m[b, t]] for b in range(B)]
    r = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in valid[b]:
            r[b][t] = float(batch.prm_logprobs[b, t]) - float(batch.ref_logprobs[b, t])  # q
        if granularity == "whole" and valid[b]:
            total = sum(r[b])
            r[b] = [0.0] * T
            r[b][valid[b][-1]] = total
    if prm_norm == "batch_norm":  # PRIME-RL dp_prime.py: q / (max |reverse cumsum q| + 1e-6), no beta
        big = max(abs(sum(r[b][t:])) for b in range(B) for t in range(T))
        r = [[x / (big + 1e-6) for x in row] for row in r]
    else:
        r = [[beta * x for x in row] for row in r]
    mean = [sum(r[b][t] for t in valid[b]) / len(valid[b]) if valid[b] else 0.0 for b in range(B)]
    R = batch.rewards.double().tolist()
    group = _group_of(batch)
    final = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        rows = group[b]
        n = len(rows)
        for t in valid[b]:
            if n == 1:
                prm = r[b][t] if singleton == "raw" else 0.0
            elif clean_loo:
                prm = r[b][t] - sum(mean[j] for j in rows if j != b) / (n - 1)
            else:
                prm = r[b][t] * n / (n - 1) - sum(mean[j] for j in rows) / (n - 1)
            final[b, t] = dpo_coef * prm
        if valid[b]:
            final[b, valid[b][-1]] += gt_coef * loop_rloo(R, rows, b, singleton)
    returns = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        acc = 0.0
        for t in reversed(valid[b]):
            acc += float(final[b, t])
            returns[b, t] = acc
    adv = loop_whiten(returns, m)
    return (adv, returns) if return_returns else adv


def loop_oprl(batch, beta=0.05, step_coef=1.0, istar_norm="batch_norm", singleton="zero"):
    B = batch.B
    group = _group_of(batch)
    s = []
    for b in range(B):
        ks, _ = steps_of(batch, b)
        sb = {k: 0.0 for k in ks}
        for t in range(batch.T):
            k = int(batch.step_ids[b, t])
            if k >= 0 and batch.response_mask[b, t]:
                sb[k] += beta * (float(batch.prm_logprobs[b, t]) - float(batch.logprobs[b, t]))  # vs pi_old
        s.append(sb)
    if istar_norm == "batch_norm":  # iStar dp_rm.py istar_norm: divide by the batch's max |step reward| + 1e-6
        big = max([abs(x) for sb in s for x in sb.values()], default=0.0)
        s = [{k: x / (big + 1e-6) for k, x in sb.items()} for sb in s]
    R = batch.rewards.double().tolist()
    out = torch.zeros(B, batch.T, dtype=torch.float64)
    for b in range(B):
        rows = group[b]
        others = [x for j in rows if j != b for x in s[j].values()]
        everyone = [x for j in rows for x in s[j].values()]
        a_s = {}
        for k, x in s[b].items():
            if not others:
                a_s[k] = x if singleton == "raw" else 0.0
            elif max(everyone) == min(everyone):
                a_s[k] = 0.0
            else:
                a_s[k] = x - sum(others) / len(others)
        a_e = loop_rloo(R, rows, b, singleton)
        out[b] = torch.tensor(_tokens(batch, b, {k: step_coef * v for k, v in a_s.items()}, a_e))
    return out


def loop_thoughts(labels):
    """Thought index of each step in a list of labels: runs of equal labels."""
    out, tid = [], -1
    for i, lab in enumerate(labels):
        if i == 0 or lab != labels[i - 1]:
            tid += 1
        out.append(tid)
    return out


def loop_tp_grpo(batch, c_pos=0.5, c_neg=0.5, adaptive=False, eps=1e-6, singleton="zero"):
    B = batch.B
    R = batch.rewards.double().tolist()
    out = torch.zeros(B, batch.T, dtype=torch.float64)
    for rows in _groups(batch).values():
        acc = min(max(sum(R[j] for j in rows) / len(rows), 0.0), 1.0)
        cp, cn = (c_pos * (1 - acc), c_neg * acc) if adaptive else (c_pos, c_neg)
        units, step_r = [], {}
        for b in rows:
            ks, _ = steps_of(batch, b)
            labels = [int(batch.step_labels[b, k]) for k in ks]
            rew = {k: R[b] + (cp if lab == 1 else -cn if lab == 0 else 0.0) for k, lab in zip(ks, labels)}
            tids = loop_thoughts(labels)
            for i, k in enumerate(ks):
                if i == 0 or tids[i] != tids[i - 1]:
                    units.append(rew[k])
            if not ks:
                units.append(R[b])
            step_r[b] = rew
        n = len(units)
        mu = sum(units) / n
        sd = math.sqrt(sum((u - mu) ** 2 for u in units) / (n - 1)) if n > 1 else 0.0
        for b in rows:
            for t in range(batch.T):
                if batch.response_mask[b, t]:
                    k = int(batch.step_ids[b, t])
                    x = step_r[b][k] if k >= 0 else R[b]
                    if len(rows) == 1:
                        out[b, t] = x if singleton == "raw" else 0.0
                    elif max(units) != min(units):
                        out[b, t] = (x - mu) / (sd + eps)
    return out


LOOPS = {
    "sum_form": loop_sum_form,
    "pure": loop_pure,
    "capo": loop_capo,
    "prime": loop_prime,
    "oprl": loop_oprl,
    "tp_grpo": loop_tp_grpo,
}
