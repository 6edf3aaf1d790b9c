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


# ---------------------------------------------------------------- multi-turn helpers
def _turns(batch, b):
    """Number of turns K_b of row b (max turn id + 1)."""
    ids = [int(x) for x in batch.turn_ids[b].tolist()]
    return max(ids) + 1 if ids else 0


def _norm(values, scale, eps, singleton="zero"):
    """{key: standardized value} over a dict of values (0 for one entry or a constant set)."""
    vals = list(values.values())
    if len(vals) == 1:
        return {k: (v if singleton == "raw" else 0.0) for k, v in values.items()}
    if max(vals) == min(vals):
        return {k: 0.0 for k in values}
    mu = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1))
    return {k: (v - mu) / (sd + eps) if scale else v - mu for k, v in values.items()}


def _write(batch, per_turn, episode=None):
    """[B,T] float64: per_turn[(b, n)] (+ episode[b]) on the valid tokens of turn n."""
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for b in range(batch.B):
        for t in range(batch.T):
            if not batch.response_mask[b, t]:
                continue
            n = int(batch.turn_ids[b, t])
            out[b, t] = (episode[b] if episode is not None else 0.0) + (per_turn.get((b, n), 0.0) if n >= 0 else 0.0)
    return out


def _discounted(rs, gamma):
    out, run = [0.0] * len(rs), 0.0
    for k in range(len(rs) - 1, -1, -1):
        run = rs[k] + gamma * run
        out[k] = run
    return out


def loop_gigpo(batch, gamma=0.95, step_coef=1.0, mode="mean_norm", episode_baseline="trajectory", eps=1e-6,
               singleton="zero"):
    scale = mode == "mean_std_norm"
    R = batch.rewards.double().tolist()
    K = [_turns(batch, b) for b in range(batch.B)]
    groups: dict = {}
    for b in range(batch.B):
        groups.setdefault(int(batch.group_ids[b]), []).append(b)
    a_e = {}
    for rows in groups.values():
        if episode_baseline == "trajectory":
            a_e.update(_norm({b: R[b] for b in rows}, scale, eps, singleton))
        else:  # every step row counts: expand each trajectory into K_b copies
            copies = {(b, k): R[b] for b in rows for k in range(K[b])}
            z = _norm(copies, scale, eps, singleton) if copies else {}
            for b in rows:
                a_e[b] = z[(b, 0)] if K[b] else (
                    0.0 if not copies else _norm({**copies, (b, -1): R[b]}, scale, eps, singleton)[(b, -1)])
    G = {}
    for b in range(batch.B):
        rs = [float(batch.turn_rewards[b, n]) for n in range(K[b])]
        for n, g in enumerate(_discounted(rs, gamma)):
            G[(b, n)] = g
    cells: dict = {}
    for (b, n), g in G.items():
        cells.setdefault((int(batch.group_ids[b]), int(batch.anchor_states[b, n])), {})[(b, n)] = g
    a_s = {}
    for members in cells.values():
        a_s.update(_norm(members, scale, eps))
    return _write(batch, {k: step_coef * v for k, v in a_s.items()}, a_e)


def loop_igpo(batch, gamma=1.0, outcome_coef=1.0, norm="group", eps=1e-6, singleton="zero"):
    R = batch.rewards.double().tolist()
    r = {}
    for b in range(batch.B):
        K = _turns(batch, b)
        for n in range(K):
            if n == K - 1:
                r[(b, n)] = outcome_coef * R[b]
            else:
                r[(b, n)] = float(batch.answer_probs[b, n + 1]) - float(batch.answer_probs[b, n])
    z = dict(r)
    if norm != "none":
        pools: dict = {}
        for (b, n), v in r.items():
            key = (int(batch.group_ids[b]), n if norm == "turn_index" else 0)
            pools.setdefault(key, {})[(b, n)] = v
        for members in pools.values():
            z.update(_norm(members, True, eps, singleton))
    out = {}
    for b in range(batch.B):
        K = _turns(batch, b)
        for n, a in enumerate(_discounted([z[(b, k)] for k in range(K)], gamma)):
            out[(b, n)] = a
    return _write(batch, out)


def loop_mt_grpo(batch, turn_coef=1.0, gamma=1.0, scale_by_std=True, baseline="turn_index", eps=1e-6,
                 singleton="zero"):
    K = [_turns(batch, b) for b in range(batch.B)]
    rs = {b: [float(batch.turn_rewards[b, n]) for n in range(K[b])] for b in range(batch.B)}
    vals = {}
    for b in range(batch.B):
        seq = rs[b] if baseline == "turn_index" else _discounted(rs[b], gamma)
        for n, v in enumerate(seq):
            vals[(b, n)] = v
    cells: dict = {}
    for (b, n), v in vals.items():
        cells.setdefault((int(batch.group_ids[b]), n), {})[(b, n)] = v
    z = {}
    for members in cells.values():
        z.update(_norm(members, scale_by_std, eps, singleton))
    if baseline == "return_to_go":
        return _write(batch, z)
    out = {}
    for b in range(batch.B):
        w = [(1.0 if n == K[b] - 1 else turn_coef) * z[(b, n)] for n in range(K[b])]
        for n, a in enumerate(_discounted(w, gamma)):
            out[(b, n)] = a
    return _write(batch, out)


def loop_oprl_turn(batch, **kw):
    from creditlab.credit.loops.process import loop_oprl

    return loop_oprl(batch.replace(step_ids=batch.turn_ids), **kw)


LOOPS.update({"gigpo": loop_gigpo, "igpo": loop_igpo, "mt_grpo": loop_mt_grpo, "oprl_turn": loop_oprl_turn})
