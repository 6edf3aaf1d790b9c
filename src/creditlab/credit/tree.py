"""Prefix-tree estimators over a group's responses: tempo, treepo.

Both read the *implicit* prefix tree (trie) that the responses of one group form over their token ids
(methods.md §4.1-4.2); neither needs a tree sampler, a critic or extra rollouts.

The trie is built by `prefix_nodes`, exactly and without hashing:
1. valid tokens are compacted to the left of each row (padding and masked observation tokens never enter the
   trie; EOS is an ordinary id), padding is encoded as 0 and tokens as id - min_id + 1;
2. rows are sorted lexicographically by (group, tokens) with one `torch.unique(dim=0)`, so that the rows
   sharing any prefix are contiguous;
3. for each pair of neighbours in that order, the length of their common valid prefix is the first column
   where they differ; the prefix of length t+1 of row k starts a new trie node iff t >= that length;
4. a cumulative sum of those "new node" flags down each column gives every (row, position) its node id.
Everything is O(B*T) tensor work plus one row sort; there is no Python loop over responses or tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.credit.ops import Singleton, broadcast, compact_left, group_index, group_stats, masked_whiten
from creditlab.credit.outcome import group_advantage
from creditlab.registry import estimator

Weight = Literal["average", "group_size"]


def prefix_nodes(ids: Tensor, mask: Tensor, group: Tensor) -> Tensor:
    """Trie node of every valid prefix: node[b,t] == node[c,u] iff t == u, rows b and c are in the same group
    and ids[b, :t+1] == ids[c, :t+1] with all those tokens valid.

    ids [B,T] long and mask [B,T] bool must be left-compacted (row b valid exactly on t < L_b, see
    `ops.compact_left`); group [B] long is a dense group index. Returns node [B,T] long with ids in
    [0, B*T) (node = t*B + rank of the prefix at position t); entries outside `mask` are meaningless.
    """
    B, T = ids.shape
    if T == 0:
        return torch.zeros(B, 0, dtype=torch.long, device=ids.device)
    lo = ids[mask].min() if bool(mask.any()) else ids.new_zeros(())
    x = torch.where(mask, ids - lo + 1, torch.zeros_like(ids))  # [B,T]: 0 = padding, never equal to a token
    key = torch.cat([group[:, None] + 1, x], dim=1)  # [B, 1+T], no 0 in the group column either
    _, inverse = torch.unique(key, dim=0, return_inverse=True)
    order = torch.argsort(inverse, stable=True)  # lexicographic row order: shared prefixes are contiguous
    ks = key[order]  # [B, 1+T]
    same = (ks[1:] == ks[:-1]) & (ks[1:] != 0)  # [B-1, 1+T]: same group / same valid token as the row above
    first_diff = torch.where(same.all(dim=1), T + 1, (~same).to(torch.uint8).argmax(dim=1))  # [B-1]
    shared = (first_diff - 1).clamp_min(0)  # tokens shared with the row above
    pos = torch.arange(T, device=ids.device)
    new = torch.cat([torch.ones(1, T, dtype=torch.bool, device=ids.device),
                     pos[None, :] >= shared[:, None]], dim=0)  # [B,T]: prefix (k, :t+1) opens a node
    node_sorted = new.to(torch.int32).cumsum(dim=0, dtype=torch.long) - 1 + pos[None, :] * B  # [B,T]
    return torch.empty_like(node_sorted).index_copy_(0, order, node_sorted)


def _node_sums(node: Tensor, mask: Tensor, row_values: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """Per-node count and sum of a per-row value over the rows whose `mask` holds at that node ([n_bins] each).

    node [B,K] long ids in [0, n_bins), mask [B,K] bool, row_values [B].
    """
    flat = node[mask]  # [N] valid (row, column) pairs
    vals = row_values.to(torch.float64)[:, None].expand_as(node)[mask]
    return torch.bincount(flat, minlength=n_bins), torch.bincount(flat, weights=vals, minlength=n_bins)


def _node_range(node: Tensor, mask: Tensor, row_values: Tensor, n_bins: int) -> tuple[Tensor, Tensor]:
    """Per-node min and max of a per-row value, as `_node_sums` ([n_bins] each, +-inf on empty nodes)."""
    flat = node[mask]
    vals = row_values.to(torch.float64)[:, None].expand_as(node)[mask]
    empty = torch.full((n_bins,), torch.inf, dtype=torch.float64, device=node.device)
    return empty.scatter_reduce(0, flat, vals, "amin"), (-empty).scatter_reduce(0, flat, vals, "amax")


def _depth_keys(node: Tensor, lengths: Tensor, segment_len: int, n_depths: int) -> tuple[Tensor, Tensor]:
    """TreePO subtree of each row at depths 1..n_depths: (key [B,D] in [0, 2*B*T), takes_part [B,D] bool).

    Depth d is row i's first d labels (segments of `segment_len` tokens). If i has d full segments, the key is
    the trie node of y_i[:d*segment_len], shared with every row passing through it. If its d-th label is a
    partial last segment, the key is the *terminal* node "ends exactly at y_i" (offset by B*T), shared only
    with identical rows, because a partial label differs from every longer row's label.
    """
    d = torch.arange(1, n_depths + 1, device=node.device)  # [D]
    end = d[None, :] * segment_len  # [1,D] tokens in the first d full segments
    col = (torch.minimum(end, lengths[:, None]) - 1).clamp_min(0)  # [B,D] last token of the first d labels
    key = node.gather(1, col) if node.shape[1] else torch.zeros_like(col)
    key = torch.where(lengths[:, None] < end, key + node.numel(), key)  # [B,D]
    return key, lengths[:, None] > end - segment_len


def _compacted(batch: RolloutBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(order, compact mask, node ids, dense group index), all in left-compacted coordinates."""
    mask = batch.response_mask
    if bool((mask[:, 1:] <= mask[:, :-1]).all()):  # already left-aligned (no holes): skip the sort
        order, cmask = torch.arange(batch.T, device=mask.device).expand_as(mask), mask
    else:
        order, cmask = compact_left(mask)  # [B,T]
    ids = batch.response_ids.gather(1, order)
    gidx, _ = group_index(batch.group_ids)
    return order, cmask, prefix_nodes(ids, cmask, gidx), gidx


def _uncompact(values: Tensor, order: Tensor, cmask: Tensor) -> Tensor:
    values = torch.where(cmask, values, torch.zeros_like(values))
    return torch.zeros_like(values).scatter(1, order, values)


@estimator("tempo", needs=("response_ids",), ranges={"td_coef": "[0, inf)", "eps": "[0, inf)"})
def tempo(batch: RolloutBatch, *, td_coef: float = 1.0, gate_root: bool = False, eps: float = 1e-6,
          unbiased: bool = True, singleton: Singleton = "zero") -> Credit:
    """TEMPO: GRPO advantage plus a branch-gated TD correction read off the group's prefix trie (P2T).

    Paper: "Exploiting Tree Structure for Credit Assignment in RL Training of LLMs" (arXiv 2509.18314).
    No public code; methods.md §4.1 (confidence: reconstructed).
    Shapes: response_ids [B,T], response_mask [B,T], rewards [B], group_ids [B] -> advantages [B,T].
    Formula: for prefix s of group g, V(s) = mean_{j in g passing through s} R_j (V(root) = mu_g); for the
    t-th valid token of row i, delta_{i,t} = (V(y_i[:t+1]) - V(y_i[:t])) / (sigma_g + eps) and
    A_{i,t} = a_i^GRPO + td_coef * delta_{i,t}. delta is 0 unless the node y_i[:t] branches (has >= 2
    children or a response ends there): it is gated by "the child holds fewer rows than its parent", so
    non-branch tokens are exactly GRPO. Telescoping: a unique response's deltas sum to a_i.
    Defaults: td_coef=1 (assumed; the paper may have no such knob), eps=1e-6, unbiased std.
    `gate_root` (default False, the methods.md formula): True drops the root branch, i.e. delta at each
    response's first token; then with no first token shared inside a group tempo equals grpo exactly.
    Which choice the paper makes could not be verified (re-checked for issue 11; only the abstract and
    summaries were searchable: "at non-branch tokens the TD term is zero, so TEMPO reduces to GRPO"; the root
    is a branch there).
    Deviations / choices:
    - V is built on the group-standardized reward (R - mu_g)/(sigma_g + eps), which equals the formula
      above and gives exact zeros: a zero-variance group has a = 0 and delta = 0, a singleton group has
      delta = 0 and a = 0 (`singleton="zero"`) or R (`"raw"`, as grpo).
    - Masked-out tokens inside a row (multi-turn observations) are skipped: the trie is over valid tokens.
    - An all-padding row is an empty response: it ends at the root and counts in V(root) = mu_g.
    Metric: credit/branch_token_frac = fraction of valid tokens with delta != 0 (methods.md §10.8).
    """
    order, cmask, node, gidx = _compacted(batch)
    a = group_advantage(batch.rewards, batch.group_ids, eps=eps, unbiased=unbiased, singleton=singleton)
    z = group_advantage(batch.rewards, batch.group_ids, eps=eps, unbiased=unbiased, singleton="zero")  # [B]
    count, total = _node_sums(node, cmask, z, node.numel())
    c_node = count[node]  # [B,T] rows through y[:t+1]
    v_node = total[node] / c_node.clamp_min(1)
    _, n_groups = group_index(batch.group_ids)
    g_count = torch.bincount(gidx, minlength=n_groups)[gidx]  # [B] rows through the root
    g_total = torch.zeros(n_groups, dtype=torch.float64, device=z.device).index_add_(0, gidx, z)[gidx]
    c_prev = torch.cat([g_count[:, None], c_node[:, :-1]], dim=1)  # [B,T] rows through y[:t]
    v_prev = torch.cat([(g_total / g_count)[:, None], v_node[:, :-1]], dim=1)
    branch = cmask & (c_prev != c_node)
    if gate_root:
        branch[:, :1] = False
    delta = torch.where(branch, v_node - v_prev, torch.zeros_like(v_node))  # [B,T]
    adv = _uncompact(a[:, None] + td_coef * delta, order, cmask).to(torch.float32)
    n_valid = max(int(cmask.sum()), 1)
    frac = float((delta != 0).sum()) / n_valid
    return Credit(advantages=adv, metrics=advantage_metrics(adv, batch.response_mask, branch_token_frac=frac))


@estimator("treepo", needs=("response_ids",), ranges={"segment_len": "[1, inf)", "max_depth": "[0, inf)"})
def treepo(batch: RolloutBatch, *, segment_len: int = 512, max_depth: int | None = None,
           weight: Weight = "average", remove_no_std_subgroup: bool = False, whiten: bool = True,
           singleton: Singleton = "zero") -> Credit:
    """TreePO: leaf reward minus the mean of each ancestor subtree, averaged over depths, then whitened.

    Paper: "TreePO: Bridging the Gap of Policy Optimization and Efficacy and Inference Efficiency with
    Heuristic Tree-based Modeling" (arXiv 2508.17445). Reference: multimodal-art-projection/TreePO
    `compute_tree_reinforce_plus_plus_baseline_outcome_advantage` (methods.md §4.2, from reference code).
    Shapes: response_ids [B,T], response_mask [B,T], rewards [B], group_ids [B] -> advantages [B,T].
    Tree: the reference reads a sampler's `tree_path` (one label per fixed-length segment). creditlab has no
    path field, so the path is read off the tokens: row i's label k is its k-th segment of `segment_len`
    valid tokens (the last one may be partial), and S_d(i) = rows of i's group whose first d labels equal
    i's. For d >= 1 only rows with at least d labels take part (a row is not its own ancestor beyond its
    end). With a segment-tree sampler of the same segment length this is exactly the reference's tree.
    Formula: c_0 = R_i - mu_g (depth 0, always included); c_d = R_i - mean_{S_d(i)} R for d = 1..D,
    skipped when |S_d(i)| = 1 (and, with `remove_no_std_subgroup`, when S_d(i) has zero variance).
    a_i = mean of the included c_d (`weight="average"`, the recipe's) or sum c_d |S_d| / sum |S_d|
    (`"group_size"`, the reference function's signature default). A = masked_whiten(broadcast(a)) over
    every valid token of the batch (`whiten=True`, as the reference; it couples prompts).
    Defaults: segment_len=512 (the paper's segment length; use the sampler's when rollouts come from a tree
    sampler; segment_len=1 gives the exact token trie of independent samples, where most shared prefixes
    are short and depth is counted in tokens), max_depth=None (all depths, as the reference, whose depth
    is set by the data; the paper's sampler stops at 14).
    Per-row, not per-token: as in the reference a_i is one scalar per leaf, broadcast on its tokens; the
    shared prefix tokens are trained once per leaf, each time with that leaf's a_i.
    Deviations: a singleton group gets a = 0 (`singleton="zero"`) where the reference takes mu := 0 so
    c_0 = R (`singleton="raw"`); "zero variance" is tested exactly (min == max) instead of torch.std == 0.
    """
    _, cmask, node, _ = _compacted(batch)
    R = batch.rewards.to(torch.float64)
    n_depths = -(-batch.T // segment_len)  # ceil(T / segment_len)
    n_depths = n_depths if max_depth is None else min(max_depth, n_depths)
    key, part = _depth_keys(node, cmask.sum(dim=1), segment_len, n_depths)
    n = torch.bincount(key[part], minlength=2 * node.numel())[key]  # [B,D] |S_d(i)|
    shared = part & (n > 1)  # beyond the divergence point every subgroup is a singleton: skip them early
    _, total = _node_sums(key, shared, R, 2 * node.numel())
    vmin, vmax = _node_range(key, shared, R, 2 * node.numel())
    constant = vmin[key] == vmax[key]
    c = torch.where(constant, torch.zeros_like(R[:, None]), R[:, None] - total[key] / n.clamp_min(1))  # [B,D]
    inc = shared
    if remove_no_std_subgroup:
        inc = inc & ~constant
    c0 = group_advantage(batch.rewards, batch.group_ids, scale_by_std=False, singleton=singleton)  # [B]
    n0 = group_stats(batch.rewards, batch.group_ids)[2]  # [B] group sizes (float64)
    w = inc.to(torch.float64) if weight == "average" else inc * n.to(torch.float64)  # [B,D]
    w0 = torch.ones_like(n0) if weight == "average" else n0
    a = (c0 * w0 + (c * w).sum(dim=1)) / (w0 + w.sum(dim=1))
    adv = broadcast(a, batch.response_mask, torch.float64)
    if whiten:
        adv = masked_whiten(adv, batch.response_mask)
    adv = adv.to(torch.float32)
    depths = float(inc.sum()) / max(int(cmask.any(dim=1).sum()), 1)
    return Credit(advantages=adv, metrics=advantage_metrics(adv, batch.response_mask, treepo_subgroups_mean=depths))
