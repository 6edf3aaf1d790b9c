"""Slow loop references for credit/segment.py (see credit/loops/__init__.py). Each returns advantages [B,T] float64.

`loop_spo_chain` walks each row as the SPO reference's `_compute_token_advantages` does (token values at cut
points, a running base, a backward fill, the probability mask); `loop_vineppo` follows VinePPO's
`_compute_step_advantages` (values per state, terminal value 0, reward on the last step); `loop_spo_tree` builds
each group's tree as nested Python dicts and recurses like SPO's `_construct_tree` / `extract_edges_from_tree`.
"""

import math

import torch

from creditlab.credit.loops.outcome import _groups


def _cuts(batch, b):
    cuts = [int(c) for c in batch.mc_cuts[b].tolist() if c >= 0]
    return cuts, [float(batch.mc_values[b, j]) for j in range(len(cuts))]


def _length(batch, b):
    cols = [t for t in range(batch.T) if batch.response_mask[b, t]]
    return cols[-1] + 1 if cols else 0


def _group_mean(batch):
    R = batch.rewards.double().tolist()
    out = {}
    for rows in _groups(batch).values():
        for i in rows:
            out[i] = sum(R[j] for j in rows) / len(rows)
    return out


def _whiten(x, keep, weight=None):
    """Weighted mean / unbiased variance over `keep` (weights 1 = loops.outcome.loop_whiten)."""
    items = [(float(x[b, t]), 1.0 if weight is None else float(weight[b, t]))
             for b in range(x.shape[0]) for t in range(x.shape[1]) if keep[b, t]]
    n = sum(w for _, w in items)
    mu = sum(v * w for v, w in items) / n if n else 0.0
    var = sum(w * (v - mu) ** 2 for v, w in items) / (n - 1) if n > 1 else 0.0
    out = torch.zeros_like(x, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if keep[b, t]:
                out[b, t] = (float(x[b, t]) - mu) / math.sqrt(var + 1e-8)
    return out


def loop_spo_chain(batch, threshold=0.9, interval=5, prompt_value="mc", prob_mask=True, whiten=True):
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    gm = _group_mean(batch)
    for b in range(batch.B):
        L = _length(batch, b)
        if L == 0:
            continue
        cuts, vals = _cuts(batch, b)
        if prompt_value == "mc" and (not cuts or cuts[0] != 0):
            raise ValueError("no cut at 0")
        if prompt_value == "group_mean":
            if cuts and cuts[0] == 0:
                vals[0] = gm[b]
            else:
                cuts, vals = [0, *cuts], [gm[b], *vals]
        cutpoints = [c - 1 for c in cuts]  # the reference's cut point: the last token of the prefix, -1 = prompt
        token_values = [None] * L
        token_values[L - 1] = float(batch.rewards[b])
        if not cutpoints:
            continue  # the reference: no cut point -> every advantage 0
        base = None
        if cutpoints[0] == -1:
            base, cutpoints, vals = vals[0], cutpoints[1:], vals[1:]
        for idx, v in zip(cutpoints, vals):
            token_values[idx] = v
        adv = [None] * L
        for i in range(L):
            if token_values[i] is not None:
                adv[i] = 0.0 if base is None else token_values[i] - base
                base = token_values[i]
        for i in range(L - 1, -1, -1):
            if adv[i] is None:
                adv[i] = adv[i + 1]
        for t in range(L):
            out[b, t] = adv[t] if batch.response_mask[b, t] else 0.0
    keep = batch.response_mask.clone()
    if prob_mask:
        keep &= batch.logprobs.double().exp() < threshold
    if whiten:
        out = _whiten(out, keep if bool(keep.any()) else batch.response_mask)
    return torch.where(keep, out, torch.zeros_like(out))


def loop_vineppo(batch, whiten=True, max_steps=None, steps="auto"):
    out = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    for b in range(batch.B):
        L = _length(batch, b)
        if L == 0:
            continue
        cuts, values = _cuts(batch, b)
        assert cuts[0] == 0
        bounds = [*cuts, L]  # step k = columns [bounds[k], bounds[k+1])
        values = [*values, 0.0]  # the value of the terminal state is by definition 0
        step_rewards = [0.0] * len(cuts)
        step_rewards[-1] = float(batch.rewards[b])
        for k in range(len(cuts)):
            a = step_rewards[k] + values[k + 1] - values[k]
            for t in range(bounds[k], bounds[k + 1]):
                if batch.response_mask[b, t]:
                    out[b, t] = a
    return _whiten(out, batch.response_mask) if whiten else out


def _row_nodes(batch, b):
    """Row b's node ids in order (runs of equal ids over its valid tokens) and the column of each token's node."""
    runs, cols = [], []
    for t in range(batch.T):
        if batch.response_mask[b, t]:
            n = int(batch.tree_node[b, t])
            if not runs or runs[-1] != n:
                runs.append(n)
            cols.append((t, n))
    return runs, cols


def _tree_value(node, rows_R, mode):
    if not node["kids"]:
        return sum(rows_R[i] for i in node["ends"]) / len(node["ends"])
    if mode == "leaf_mean":
        return sum(rows_R[i] for i in node["rows"]) / len(node["rows"])
    return sum(_tree_value(k, rows_R, mode) for k in node["kids"].values()) / len(node["kids"])


def loop_spo_tree(batch, value="mean_of_means", baseline="parent_mean", std_normalize=False, edge_weight="once",
                  drop_zero_edges=True, threshold=0.9, prob_mask=True, whiten=True, eps=1e-8):
    R = batch.rewards.double().tolist()
    edge_adv, rows_through = {}, {}
    for rows in _groups(batch).values():
        root = {"kids": {}, "rows": [], "ends": []}
        for i in rows:
            runs, _ = _row_nodes(batch, i)
            if not runs:
                continue
            node = root
            node["rows"].append(i)
            for n in runs:
                node = node["kids"].setdefault(n, {"kids": {}, "rows": [], "ends": []})
                node["rows"].append(i)
            node["ends"].append(i)

        def visit(parent):
            kids = list(parent["kids"].items())
            vals = [_tree_value(k, R, value) for _, k in kids]
            v_parent = _tree_value(parent, R, value)
            mean = sum(vals) / len(vals) if vals else 0.0
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)) if vals else 0.0
            for (n, kid), v in zip(kids, vals):
                if baseline == "parent_mean":
                    a = v - v_parent
                else:
                    others = [u for (m, _), u in zip(kids, vals) if m != n]
                    a = v - sum(others) / len(others) if others else 0.0
                a = 0.0 if abs(a) <= 1e-12 else a  # rounding noise of equal values
                if std_normalize:
                    a = a / (std + eps)
                edge_adv[n], rows_through[n] = a, len(kid["rows"])
                visit(kid)

        visit(root)
    adv = torch.zeros(batch.response_ids.shape, dtype=torch.float64)
    weight = torch.ones_like(adv)
    keep = torch.zeros(batch.response_ids.shape, dtype=torch.bool)
    for b in range(batch.B):
        for t, n in _row_nodes(batch, b)[1]:
            adv[b, t] = edge_adv[n]
            weight[b, t] = 1.0 / rows_through[n] if edge_weight == "once" else 1.0
            keep[b, t] = not (prob_mask and math.exp(float(batch.logprobs[b, t])) >= threshold)
            if drop_zero_edges and edge_adv[n] == 0:
                keep[b, t] = False
    if whiten:
        adv = _whiten(adv, keep, weight)
    return torch.where(keep, adv * weight, torch.zeros_like(adv))


LOOPS = {
    "spo_chain": lambda batch, **kw: loop_spo_chain(batch, **kw),
    "vineppo": lambda batch, **kw: loop_vineppo(batch, **kw),
    "spo_tree": lambda batch, **kw: loop_spo_tree(batch, **kw),
}
