"""Slow, obviously-correct loop references for MA-RLHF, POAD and ArCHer (`creditlab.credit.macro`).

Each follows its reference code's loop structure (MA-RLHF's split-point lists and `modeling_macro_action`, POAD's
`batch_process_tppo` double loop, ArCHer's per-utterance Q - V) one row at a time, with creditlab's documented
corrections (per-row segmentation, no empty macro, summed macro rewards).
"""

import math

import torch

from creditlab.credit.loops.outcome import loop_whiten


def _rows(batch):
    """Per row: the list of valid columns in order."""
    return [[t for t in range(batch.T) if batch.response_mask[b, t]] for b in range(batch.B)]


def _runs(ids):
    """Split a list of ids into runs of equal consecutive values -> list of lists of positions (into `ids`)."""
    runs = []
    for i, v in enumerate(ids):
        if i == 0 or v != ids[i - 1]:
            runs.append([])
        runs[-1].append(i)
    return runs


def _split_points(rule, L, n, lengths, ref, compat=False):
    """MA-RLHF's `ma_lengths` for one row of L valid tokens: macro start indices, ending with L - 1.

    compat=True keeps the reference's unconditional final append, which leaves an empty macro (V = R = 0) when a
    count ends exactly at L - 1 (e.g. fixed n = 2 with L = 5)."""
    ma = [0]
    if rule == "fixed":
        count = 0
        for i in range(L - 1):
            count += 1
            if count == n:
                ma.append(i + 1)
                count = 0
    elif rule == "randomized":
        count, idx = 0, 0
        for i in range(L - 1):
            count += 1
            if count == lengths[idx]:
                ma.append(i + 1)
                count, idx = 0, idx + 1
                if idx == len(lengths):
                    break
    elif rule == "ppl":
        ppl = [math.exp(-x) for x in ref]
        ma = [i for i in range(L - 1) if ppl[i + 1] > ppl[i]]
        if 0 not in ma:
            ma = [0, *ma]
    if compat or ma[-1] != L - 1:  # the reference always appends L - 1; a duplicate is an empty macro
        ma.append(L - 1)
    return ma


def _weights(k, weighting):
    if weighting == "equal":
        return [1.0 / k] * k
    if weighting == "unit":
        return [0.0] * (k - 1) + [1.0]
    inv = [1.0 / (j + 1) for j in range(k)]
    return [w / sum(inv) for w in inv]


def _shuffled_lengths(batch, b, repeat_times, seed):
    from creditlab.credit.macro import RANDOMIZED_LENGTHS, _hash_rows, shuffle_keys  # the shared seeded shuffle

    ids = batch.response_ids[b][batch.response_mask[b]]
    h = _hash_rows(ids[None, :], torch.ones(1, ids.numel(), dtype=torch.bool), seed)
    base = [x for x in RANDOMIZED_LENGTHS for _ in range(repeat_times)]
    keys = shuffle_keys(h, len(base))[0].tolist()
    return [base[j] for j in sorted(range(len(base)), key=lambda j: (keys[j], j))]


def loop_ma_rlhf(batch, rule="fixed", n=5, repeat_times=3, seed=0, weighting="equal", reward_agg="sum",
                 gamma=1.0, lam=0.95, whiten=False, return_returns=False, compat=False):
    adv = torch.zeros(batch.B, batch.T, dtype=torch.float64)
    ret = torch.zeros_like(adv)
    for b, cols in enumerate(_rows(batch)):
        L = len(cols)
        if L == 0:
            continue
        V = [float(batch.values[b, t]) for t in cols]
        r = [float(batch.token_rewards[b, t]) for t in cols]
        ref = [float(batch.ref_logprobs[b, t]) for t in cols]
        lengths = _shuffled_lengths(batch, b, repeat_times, seed) if rule == "randomized" else None
        ma = _split_points(rule, L, n, lengths, ref, compat)
        spans = [list(range(ma[k], ma[k + 1])) for k in range(len(ma) - 1)] + [[L - 1]]
        mv, mr = [], []
        for span in spans:
            if not span:  # compat: an empty macro aggregates to 0 (`masked_vars.numel() == 0`)
                mv.append(0.0)
                mr.append(0.0)
                continue
            w = _weights(len(span), weighting)
            mv.append(sum(wi * V[i] for wi, i in zip(w, span)))
            mr.append(sum(r[i] for i in span) if reward_agg == "sum" else sum(wi * r[i] for wi, i in zip(w, span)))
        lastgaelam, A = 0.0, [0.0] * len(spans)
        for k in reversed(range(len(spans))):  # get_advantages_and_returns
            nextvalue = mv[k + 1] if k < len(spans) - 1 else 0.0
            delta = mr[k] + gamma * nextvalue - mv[k]
            lastgaelam = delta + gamma * lam * lastgaelam
            A[k] = lastgaelam
        for k, span in enumerate(spans):
            for i in span:
                adv[b, cols[i]], ret[b, cols[i]] = A[k], A[k] + mv[k]
    adv = loop_whiten(adv, batch.response_mask) if whiten else adv
    return (adv, ret) if return_returns else adv


def loop_poad(batch, action_ids, gamma=0.95, lam=0.95, whiten=True, return_returns=False):
    adv = torch.zeros(batch.B, batch.T, dtype=torch.float64)
    ret = torch.zeros_like(adv)
    for b, cols in enumerate(_rows(batch)):
        V = [float(batch.values[b, t]) for t in cols]
        r = [float(batch.token_rewards[b, t]) for t in cols]
        actions = _runs([int(action_ids[b, t]) for t in cols])
        gae, next_first = 0.0, None
        for a in reversed(range(len(actions))):  # batch_process_tppo: steps reversed, tokens reversed
            toks = actions[a]
            rew = sum(r[i] for i in toks)
            for i in reversed(toks):
                if i == toks[-1]:
                    v_next = V[next_first] if next_first is not None else 0.0
                    delta = rew + gamma * v_next - V[i]
                    gae = delta + gamma * lam * gae
                else:
                    delta = V[i + 1] - V[i]
                    gae = delta + lam * gae
                adv[b, cols[i]], ret[b, cols[i]] = gae, gae + V[i]
            next_first = toks[0]
    adv = loop_whiten(adv, batch.response_mask) if whiten else adv
    return (adv, ret) if return_returns else adv


def loop_archer(batch, whiten=False):
    adv = torch.zeros(batch.B, batch.T, dtype=torch.float64)
    for b, cols in enumerate(_rows(batch)):
        for run in _runs([int(batch.turn_ids[b, t]) for t in cols]):
            first = cols[run[0]]
            a = float(batch.q_values[b, first]) - float(batch.values[b, first])
            for i in run:
                adv[b, cols[i]] = a
    return loop_whiten(adv, batch.response_mask) if whiten else adv


LOOPS = {
    "ma_rlhf": loop_ma_rlhf,
    "poad": lambda batch, **kw: loop_poad(batch, batch.step_ids, **kw),
    "poad_turns": lambda batch, **kw: loop_poad(batch, batch.turn_ids, **kw),
    "archer": loop_archer,
}
