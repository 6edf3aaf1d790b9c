"""Slow loop references for credit/tree.py (see credit/loops/__init__.py).

`loop_tempo` builds a Python dict-trie per group and follows methods.md §4.1 literally; `loop_treepo` builds
path strings per row and follows the TreePO reference function (methods.md §4.2) depth by depth.
Both return advantages [B,T] float64.
"""

import math

import torch

from creditlab.credit.loops.outcome import _groups, loop_grpo, loop_whiten, to_tokens


def _valid_tokens(batch, b):
    """Row b's valid token ids in order (padding and masked-out tokens skipped)."""
    return [int(batch.response_ids[b, t]) for t in range(batch.T) if batch.response_mask[b, t]]


def _group_std(vals):
    n = len(vals)
    mu = sum(vals) / n
    return math.sqrt(sum((v - mu) ** 2 for v in vals) / (n - 1)) if n > 1 else 0.0


def loop_tempo(batch, td_coef=1.0, gate_root=False, eps=1e-6, singleton="zero"):
    a = loop_grpo(batch, eps=eps, singleton=singleton)
    R = batch.rewards.double().tolist()
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for rows in _groups(batch).values():
        sigma = _group_std([R[i] for i in rows])
        constant = max(R[i] for i in rows) == min(R[i] for i in rows)
        root = {"n": 0, "sum": 0.0, "kids": {}}
        for i in rows:  # insert every response; each node counts the responses passing through it
            node = root
            node["n"] += 1
            node["sum"] += R[i]
            for tok in _valid_tokens(batch, i):
                node = node["kids"].setdefault(tok, {"n": 0, "sum": 0.0, "kids": {}})
                node["n"] += 1
                node["sum"] += R[i]
        for i in rows:
            node = root
            cols = [t for t in range(batch.T) if batch.response_mask[i, t]]
            for k, t in enumerate(cols):
                child = node["kids"][int(batch.response_ids[i, t])]
                delta = (child["sum"] / child["n"] - node["sum"] / node["n"]) / (sigma + eps)
                if constant or (gate_root and k == 0):
                    delta = 0.0
                out[i, t] = a[i] + td_coef * delta
                node = child
    return out


def _paths(batch, rows, segment_len):
    """Per row: the list of its segment labels (tuples of `segment_len` token ids, the last maybe shorter)."""
    out = {}
    for i in rows:
        toks = _valid_tokens(batch, i)
        out[i] = [tuple(toks[k:k + segment_len]) for k in range(0, len(toks), segment_len)]
    return out


def loop_treepo(batch, segment_len=512, max_depth=None, weight="average", remove_no_std_subgroup=False,
                whiten=True, singleton="zero"):
    R = batch.rewards.double().tolist()
    a = [0.0] * batch.B
    for rows in _groups(batch).values():
        paths = _paths(batch, rows, segment_len)
        deepest = max(len(p) for p in paths.values())
        depth_cap = deepest if max_depth is None else min(deepest, max_depth)
        items = {i: [] for i in rows}  # row -> [(c_d, subgroup size)]
        for depth in range(depth_cap + 1):
            members = {}
            for i in rows:
                if depth == 0 or len(paths[i]) >= depth:
                    members.setdefault(tuple(paths[i][:depth]), []).append(i)
            for sub in members.values():
                vals = [R[j] for j in sub]
                mean = sum(vals) / len(vals)
                for i in sub:  # a constant subgroup (a singleton included) gives exactly 0
                    c = 0.0 if max(vals) == min(vals) else R[i] - mean
                    if depth == 0:
                        items[i].append((c, len(sub)))
                    elif len(sub) > 1 and not (remove_no_std_subgroup and max(vals) == min(vals)):
                        items[i].append((c, len(sub)))
        for i in rows:
            if len(rows) == 1 and singleton == "raw":
                items[i] = [(R[i], 1)]  # the reference's mu := 0 for a lone response
            if weight == "average":
                a[i] = sum(c for c, _ in items[i]) / len(items[i])
            else:
                a[i] = sum(c * n for c, n in items[i]) / sum(n for _, n in items[i])
    adv = to_tokens(a, batch)
    return loop_whiten(adv, batch.response_mask) if whiten else adv


LOOPS = {
    "tempo": lambda batch, **kw: loop_tempo(batch, **kw),
    "treepo": lambda batch, **kw: loop_treepo(batch, **kw),
}
