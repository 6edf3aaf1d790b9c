"""Monte-Carlo segment estimators: spo_chain, vineppo (values at cut points) and spo_tree (a sampled segment tree).

Values of *partial* responses come from sampling, not from a critic (methods.md §4.4-4.6):

- `spo_chain` and `vineppo` read Monte-Carlo values at cut points: ``mc_cuts [B,C]`` holds the response prefix
  length c of each state (0 = the prompt alone) and ``mc_values [B,C]`` the mean reward of K continuations of
  prompt + response[:c]. With cuts c_0 < c_1 < ... < c_{n-1} the tokens [c_j, c_{j+1}) form segment j and get
  V(c_{j+1}) - V(c_j); the last segment [c_{n-1}, L) gets R - V(c_{n-1}) (V of the finished response is its
  reward). Where the cuts go is the method: SPO cuts before low-probability tokens, VinePPO at reasoning-step
  starts. The cut rules live with the sampler (`creditlab.signals.mc`, which the trainer runs before the
  estimator); these functions only read the cuts, so they work with values from any source.
- `spo_tree` reads ``tree_node [B,T]`` from the segment-tree sampler (`creditlab.rollout.tree`): one row per leaf,
  each token tagged with the tree node (segment) it was sampled in. A node's value is computed from the leaves
  below it; a segment's advantage is its node's value minus its parent's.

Shapes: B rows, T tokens, C cut columns, N distinct tree nodes, D tree depth. Everything is tensor work; the only
Python loop is over the D levels of a tree (bottom-up values), never over responses or tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from creditlab.batch import Credit, RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.credit.ops import compact_left, group_index, group_stats, masked_whiten
from creditlab.registry import estimator

PromptValue = Literal["mc", "group_mean", "zero"]
StepSplit = Literal["auto", "task", "newline", "double_newline"]
TreeValue = Literal["mean_of_means", "leaf_mean"]
TreeBaseline = Literal["parent_mean", "leave_one_out"]
EdgeWeight = Literal["once", "per_leaf"]
ZERO_EDGE = 1e-12  # |V(child) - baseline| at or below this is float rounding of equal values: exactly 0


# ------------------------------------------------------------------------------------------------ cut segments
def response_lengths(mask: Tensor) -> Tensor:
    """[B] long: last valid column + 1 (0 for a row without valid tokens)."""
    T = mask.shape[1]
    if T == 0:
        return torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    last = T - mask.flip(1).to(torch.int8).argmax(dim=1)  # [B]
    return torch.where(mask.any(dim=1), last, torch.zeros_like(last))


def segment_of_tokens(cuts: Tensor, T: int) -> Tensor:
    """[B,T] long: index of the last cut <= t (the segment token t is in); -1 before the first cut.

    cuts [B,C] long, valid cuts first and increasing, -1 padding after them.
    """
    B = cuts.shape[0]
    big = torch.where(cuts >= 0, cuts, torch.full_like(cuts, T + 1))  # padding sorts past every column
    t = torch.arange(T, device=cuts.device).expand(B, T).contiguous()
    return torch.searchsorted(big.contiguous(), t, right=True) - 1


def cut_advantages(cuts: Tensor, values: Tensor, rewards: Tensor, mask: Tensor) -> Tensor:
    """Segment advantages on tokens, float64 [B,T]: V(c_{j+1}) - V(c_j) on [c_j, c_{j+1}), R - V(c_last) on the last
    segment, 0 before the first cut and outside `mask`. Raises if a cut is not inside its response."""
    B, T = mask.shape
    C = cuts.shape[1]
    if C == 0:
        return torch.zeros(B, T, dtype=torch.float64, device=mask.device)
    lengths = response_lengths(mask)  # [B]
    bad = (cuts >= lengths[:, None]) & (cuts >= 0) & (lengths > 0)[:, None]  # empty rows get 0 anyway
    if bool(bad.any()):
        b = int(bad.any(dim=1).nonzero()[0])
        raise ValueError(f"RolloutBatch.mc_cuts row {b} has a cut at or past its response length "
                         f"{int(lengths[b])}: a cut must leave at least one response token to credit")
    n = (cuts >= 0).sum(dim=1)  # [B] cuts per row
    V = values.to(torch.float64)
    V_next = torch.cat([V[:, 1:], torch.zeros_like(V[:, :1])], dim=1)  # [B,C]
    is_last = torch.arange(C, device=cuts.device)[None, :] == (n - 1)[:, None]  # [B,C]
    seg_adv = torch.where(is_last, rewards.to(torch.float64)[:, None] - V, V_next - V)  # [B,C]
    seg = segment_of_tokens(cuts, T)  # [B,T]
    out = seg_adv.gather(1, seg.clamp_min(0))
    return torch.where((seg >= 0) & mask, out, torch.zeros_like(out))


def _with_prompt_value(batch: RolloutBatch, prompt_value: str) -> tuple[Tensor, Tensor]:
    """(cuts, values) with the prompt state's value set as `prompt_value` asks (see spo_chain)."""
    cuts, values = batch.mc_cuts, batch.mc_values.to(torch.float64)
    nonempty = batch.response_mask.any(dim=1)
    has0 = cuts[:, 0] == 0 if cuts.shape[1] else torch.zeros_like(nonempty)
    if prompt_value == "mc":
        missing = nonempty & ~has0
        if bool(missing.any()):
            b = int(missing.nonzero()[0])
            raise ValueError(f"spo_chain(prompt_value='mc') needs V(prompt): RolloutBatch.mc_cuts row {b} has no cut "
                             "at 0; sample it (creditlab.signals.mc does) or pass prompt_value='zero' to reproduce "
                             "the reference code's zero first segment")
        return cuts, values
    if prompt_value == "group_mean":
        mean = group_stats(batch.rewards, batch.group_ids)[0]  # [B] mean outcome of the row's group
        pad_c = torch.full_like(cuts[:, :1], -1)
        pad_v = torch.zeros_like(values[:, :1])
        kept_c = torch.cat([cuts, pad_c], dim=1)  # rows that already have a cut at 0: replace its value
        kept_v = torch.cat([values, pad_v], dim=1)
        kept_v[:, 0] = torch.where(has0, mean, kept_v[:, 0])
        new_c = torch.cat([torch.zeros_like(pad_c), cuts], dim=1)  # others: insert the prompt state
        new_v = torch.cat([mean[:, None], values], dim=1)
        return torch.where(has0[:, None], kept_c, new_c), torch.where(has0[:, None], kept_v, new_v)
    return cuts, values  # "zero": tokens before the first cut get 0, as the reference code


def _check_prob(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")


@estimator("spo_chain", needs=("logprobs", "mc_values", "mc_cuts"),
           ranges={"threshold": "(0, 1]", "interval": "[1, inf)"})
def spo_chain(batch: RolloutBatch, *, threshold: float = 0.9, interval: int = 5, prompt_value: PromptValue = "mc",
              prob_mask: bool = True, whiten: bool = True) -> Credit:
    """SPO-chain: segments cut before low-probability tokens, advantage V(end) - V(start) from Monte-Carlo values.

    Paper: "Segment Policy Optimization: Effective Segment-Level Credit Assignment in RL for Large Language Models"
    (arXiv 2505.23564). Reference: AIFrameResearch/SPO@b9fc6a2 `src/treetune/episode_generators/
    math_episode_generator_with_mc_advantages.py` (`_create_value_estimation_requests`, `_compute_token_advantages`)
    and `src/treetune/trainers/ppo_trainer.py` + `trainers/utils.py` (`masked_whiten`, `use_prob_mask`).
    Shapes: logprobs [B,T], mc_cuts [B,C], mc_values [B,C], rewards [B] -> advantages [B,T].
    Cuts (placed by `creditlab.signals.mc.spo_chain_cuts`, which reads `threshold`, `interval` and `prompt_value`
    from these keywords): L = {t : p_t < threshold}, every `interval`-th of them (L[::interval]); a cut *before*
    token t is the prefix length t (the code's cut point t - 1, -1 = the prompt). V(c) = mean reward of K
    continuations of prompt + response[:c].
    Formula: tokens in [c_j, c_{j+1}) get V(c_{j+1}) - V(c_j); the last segment [c_last, L) gets R - V(c_last).
    Probability mask (`prob_mask`): tokens with p_t >= threshold get 0 (the code zeroes p > .9 in the advantages
    and drops p >= .9 from the loss; the union is what trains). Whitening (`whiten`): mean / unbiased std over the
    kept tokens of the whole batch (the code's masked_whiten with prob mask), then masked tokens are 0 again.
    Defaults from the code: threshold 0.9 (hard-coded there), interval 5, whitening and prob mask on.
    `prompt_value`: "mc" (default, **documented deviation**): the prompt state is always a cut, its value sampled
    like every other (K prompt-only continuations, shared by a group), so the first segment gets V(c_1) - V(prompt)
    as in the paper. "zero": the reference code: the prompt is a cut only when token 0 is a low-probability token;
    otherwise every token before the first cut gets 0 (and a row with no cut at all gets 0 everywhere).
    "group_mean": V(prompt) = the group's mean reward (no extra samples).
    Deviations: the masked tokens stay in the trainer's token-mean denominator (the code removes them from the
    loss mask), so the update is scaled by the kept fraction; cut points come from the rollout's log-probs
    (equal to the trainer's recomputation in fp32), which the methods.md pitfall asks for.
    """
    _check_prob(threshold)
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    if prompt_value not in ("mc", "group_mean", "zero"):
        raise ValueError(f"prompt_value must be 'mc', 'group_mean' or 'zero', got {prompt_value!r}")
    mask = batch.response_mask
    cuts, values = _with_prompt_value(batch, prompt_value)
    adv = cut_advantages(cuts, values, batch.rewards, mask)  # [B,T] float64
    keep = mask & (batch.logprobs.double().exp() < threshold) if prob_mask else mask
    if whiten:
        adv = masked_whiten(adv, keep if bool(keep.any()) else mask)
    adv = torch.where(keep, adv, torch.zeros_like(adv)).to(torch.float32)
    n_valid = max(int(mask.sum()), 1)
    rows = max(int(mask.any(dim=1).sum()), 1)
    return Credit(advantages=adv, metrics=advantage_metrics(
        adv, mask, spo_masked_frac=float((mask & ~keep).sum()) / n_valid,
        mc_cuts_mean=float(((cuts >= 0) & mask.any(dim=1, keepdim=True)).sum()) / rows))


@estimator("vineppo", needs=("mc_values", "mc_cuts"), ranges={"max_steps": "[1, inf)"})
def vineppo(batch: RolloutBatch, *, whiten: bool = True, max_steps: int | None = None, steps: StepSplit = "auto"
            ) -> Credit:
    """VinePPO: V at every reasoning-step boundary from K Monte-Carlo rollouts, A_k = r_k + V(s_{k+1}) - V(s_k).

    Paper: "VinePPO: Refining Credit Assignment in RL Training of LLMs" (arXiv 2410.01679). Reference:
    McGill-NLP/VinePPO@efe7228 `src/treetune/episode_generators/math_episode_generator_with_mc_advantages.py`
    (`_create_value_estimation_requests`, `_compute_step_advantages`, `_compute_mc_value`) and
    `src/treetune/trainers/ppo_trainer.py` (`whiten_advantages`, masked_whiten with unbiased variance).
    Shapes: mc_cuts [B,C], mc_values [B,C], rewards [B] -> advantages [B,T].
    States (placed by `creditlab.signals.mc.step_start_cuts`, which reads `steps` and `max_steps` from these
    keywords): s_0 = the prompt (cut 0), s_k = the prefix before step k's first token, k = 1..n-1, with steps from
    `creditlab.signals.steps` (`steps="auto"`: the task's own step spans when its verifier gives them, else one
    step per line, the reference's "\\n" delimiter). V(s_k) = mean reward of K continuations; continuations cut by
    the length limit score `unfinished_penalty` (the sampler's option; the reference configs use 0).
    Formula: A_k = r_k + V(s_{k+1}) - V(s_k) with V(terminal) = 0 and r = R on the last step only, i.e. step k
    gets V(s_{k+1}) - V(s_k) and the last step R - V(s_{n-1}); Σ_k A_k = R - V(s_0). Each token gets its step's
    advantage (tokens between steps belong to the step before them; EOS to the last step, as the reference
    maps it). `max_steps` (the reference's max_step_for_value_estimation; None = every step, configs use 20-25):
    states past it are not sampled; the reference fills them backwards from the return (V = R), which the sampler
    writes as a cut with value R, so those steps get 0. Whitening over all valid tokens of the batch (`whiten`,
    on in the reference's MATH/GSM8K configs).
    Deviation: a truncated *response* keeps the reward its task gives (the reference replaces it by the penalty).
    """
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 or None, got {max_steps}")
    if steps not in ("auto", "task", "newline", "double_newline"):
        raise ValueError(f"steps must be 'auto', 'task', 'newline' or 'double_newline', got {steps!r}")
    mask = batch.response_mask
    cuts = batch.mc_cuts
    has0 = cuts[:, 0] == 0 if cuts.shape[1] else torch.zeros(batch.B, dtype=torch.bool, device=mask.device)
    missing = mask.any(dim=1) & ~has0
    if bool(missing.any()):
        b = int(missing.nonzero()[0])
        raise ValueError(f"vineppo needs V(s_0) of every response: RolloutBatch.mc_cuts row {b} has no cut at 0")
    adv = cut_advantages(cuts, batch.mc_values, batch.rewards, mask)  # [B,T] float64
    if whiten:
        adv = masked_whiten(adv, mask)
    adv = adv.to(torch.float32)
    rows = max(int(mask.any(dim=1).sum()), 1)
    return Credit(advantages=adv, metrics=advantage_metrics(
        adv, mask, mc_cuts_mean=float(((cuts >= 0) & mask.any(dim=1, keepdim=True)).sum()) / rows))


# ------------------------------------------------------------------------------------------------ segment tree
@dataclass
class Tree:
    """A segment tree read off ``tree_node``: N nodes (dense indices 0..N-1) and G roots (index N + dense group)."""

    dense: Tensor  # [B,T] node index of each valid token, -1 elsewhere
    path: Tensor  # [B,D] node index at each level of the row, -1 past its depth
    depth: Tensor  # [B] nodes per row (0 for a row without valid tokens)
    parent: Tensor  # [N] parent node index, or N + g for the root of group g
    level: Tensor  # [N] depth of the node below its root (0 = a first segment)
    leaf: Tensor  # [N] bool: the node ends a row
    N: int
    G: int


def tree_structure(node: Tensor, mask: Tensor, group: Tensor, G: int) -> Tree:
    """Read the tree from ``tree_node [B,T]`` (valid tokens only; a row's nodes in order, each a run of tokens).

    Raises ValueError naming the inconsistency when the ids do not form a tree: a node with two parents (or seen
    twice in a row), or a node that ends one row but continues in another.
    """
    B, T = mask.shape
    dev = mask.device
    if bool((mask[:, 1:] <= mask[:, :-1]).all()):  # left-aligned rows: no compaction needed
        order, cmask = torch.arange(T, device=dev).expand(B, T), mask
    else:
        order, cmask = compact_left(mask)  # [B,T] masked-out columns (observations) moved behind the row
    cn = torch.where(cmask, node.gather(1, order), torch.full_like(node, -1))  # [B,T] compacted ids
    prev = torch.cat([torch.full_like(cn[:, :1], -1), cn[:, :-1]], dim=1)
    starts = cmask & ((cn != prev) | (torch.arange(T, device=dev) == 0))  # [B,T] first token of a node's run
    level_c = starts.long().cumsum(dim=1) - 1  # [B,T] run index along the row
    depth = starts.sum(dim=1)  # [B]
    D = max(int(depth.max()) if B else 0, 1)
    raw = torch.full((B, D + 1), -1, dtype=torch.long, device=dev)  # column D collects non-start tokens
    raw.scatter_(1, torch.where(starts, level_c, D), torch.where(starts, cn, -1))
    raw = raw[:, :D]  # [B,D] node id at each level
    present = raw >= 0
    uniq, inverse = torch.unique(raw[present], return_inverse=True)
    N = int(uniq.numel())
    path = torch.full_like(raw, -1)
    path[present] = inverse  # [B,D] dense
    lvl = torch.arange(D, device=dev).expand(B, D)
    parent_entry = torch.where(lvl == 0, N + group[:, None],
                               torch.cat([torch.full_like(path[:, :1], -1), path[:, :-1]], dim=1))  # [B,D]
    flat_n, flat_p, flat_l = path[present], parent_entry[present], lvl[present]
    is_end = (lvl == (depth - 1)[:, None])[present]  # the entry is its row's last node
    p_lo = torch.full((N,), N + G, device=dev).scatter_reduce(0, flat_n, flat_p, "amin")
    p_hi = torch.full((N,), -1, device=dev).scatter_reduce(0, flat_n, flat_p, "amax")
    ends = torch.zeros(N, dtype=torch.long, device=dev).index_add_(0, flat_n, is_end.long())
    goes_on = torch.zeros(N, dtype=torch.long, device=dev).index_add_(0, flat_n, (~is_end).long())
    if bool((p_lo != p_hi).any()):
        bad = int(uniq[(p_lo != p_hi).nonzero()[0]])
        raise ValueError(f"RolloutBatch.tree_node: node {bad} follows different segments in different rows (or "
                         "appears twice in a row): the ids do not form a tree")
    if bool(((ends > 0) & (goes_on > 0)).any()):
        bad = int(uniq[((ends > 0) & (goes_on > 0)).nonzero()[0]])
        raise ValueError(f"RolloutBatch.tree_node: node {bad} ends one row but continues in another; a finished "
                         "segment is a leaf")
    level = torch.zeros(N, dtype=torch.long, device=dev).scatter(0, flat_n, flat_l)
    level_tok = torch.zeros_like(level_c).scatter(1, order, level_c)  # [B,T] back to the original columns
    dense = torch.where(mask, path.gather(1, level_tok.clamp(0, D - 1)), torch.full_like(level_tok, -1))
    return Tree(dense, path, depth, p_lo, level, ends > 0, N, G)


def tree_values(tree: Tree, rewards: Tensor, mode: str) -> Tensor:
    """V of every node and root, float64 [N + G]: a leaf's V is the mean R of the rows ending at it (one, from the
    sampler); an inner node's is the mean of its children's V (`"mean_of_means"`, SPO's recursion) or the mean R of
    every row below it (`"leaf_mean"`). A root's V is computed the same way over its group's rows."""
    N, G, dev = tree.N, tree.G, rewards.device
    R = rewards.to(torch.float64)
    on = tree.path >= 0  # [B,D] (row, node) pairs
    rows = tree.depth > 0  # [B] rows that are part of a tree
    root = tree.parent[tree.path[:, 0].clamp_min(0)] if N else torch.zeros_like(tree.depth)  # [B] N + g

    def zeros() -> Tensor:
        return torch.zeros(N + G, dtype=torch.float64, device=dev)

    if mode == "leaf_mean":
        pair_n = torch.cat([tree.path[on], root[rows]])
        pair_r = torch.cat([R[:, None].expand_as(tree.path)[on], R[rows]])
        count = zeros().index_add_(0, pair_n, torch.ones_like(pair_r))
        return zeros().index_add_(0, pair_n, pair_r) / count.clamp_min(1)
    end_n = tree.path.gather(1, (tree.depth - 1).clamp_min(0)[:, None]).squeeze(1)[rows]  # leaf of each row
    cnt = zeros().index_add_(0, end_n, torch.ones_like(R[rows]))
    V = torch.where(cnt > 0, zeros().index_add_(0, end_n, R[rows]) / cnt.clamp_min(1), zeros())  # leaves
    n_child = zeros().index_add_(0, tree.parent, torch.ones(N, dtype=torch.float64, device=dev))
    inner = torch.cat([~tree.leaf, torch.ones(G, dtype=torch.bool, device=dev)])  # nodes and roots with children
    for d in range(int(tree.level.max()) if N else -1, -1, -1):  # level d's values complete their parents'
        sel = tree.level == d
        has = torch.zeros(N + G, dtype=torch.bool, device=dev)
        has[tree.parent[sel]] = True
        V = torch.where(has & inner, zeros().index_add_(0, tree.parent[sel], V[:N][sel]) / n_child.clamp_min(1), V)
    return V


def _weighted_whiten(x: Tensor, keep: Tensor, w: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and unbiased variance over `keep` entries weighted by `w` (w = 1 is
    masked_whiten; w = 1/copies counts each distinct token once). 0 outside `keep`."""
    w = torch.where(keep, w.to(torch.float64), torch.zeros_like(w, dtype=torch.float64))
    n = w.sum()
    mean = (w * x).sum() / n.clamp_min(1e-12)
    var = torch.where(n > 1, (w * (x - mean) ** 2).sum() / (n - 1).clamp_min(1e-12), torch.zeros_like(n))
    out = (x - mean) * torch.rsqrt(var + eps)
    return torch.where(keep, out, torch.zeros_like(out))


@estimator("spo_tree", needs=("tree_node", "logprobs"), ranges={"threshold": "(0, 1]", "eps": "[0, inf)"})
def spo_tree(batch: RolloutBatch, *, value: TreeValue = "mean_of_means", baseline: TreeBaseline = "parent_mean",
             std_normalize: bool = False, edge_weight: EdgeWeight = "once", drop_zero_edges: bool = True,
             threshold: float = 0.9, prob_mask: bool = True, whiten: bool = True, eps: float = 1e-8) -> Credit:
    """SPO-tree: a fixed-shape segment tree; each segment (edge) gets V(child) - V(parent), trained once.

    Paper: arXiv 2505.23564 (long chain-of-thought variant). Reference: AIFrameResearch/SPO@b9fc6a2
    `src/treetune/inference_strategies/hybrid_inference_strategy.py` (`_construct_tree`),
    `src/treetune/episode_generators/tree_episode_generator.py` (`extract_edges_from_tree`),
    `src/treetune/episode_generators/hybrid_episode_generator.py`, trainer as spo_chain.
    Shapes: tree_node [B,T] (one row per leaf, from `creditlab.rollout.tree`), logprobs [B,T], rewards [B] ->
    advantages [B,T].
    Values: V(leaf) = R; an inner node's V is the mean of its children's V (`value="mean_of_means"`, the code's
    recursion: `node["reward"] = np.mean(child_rewards)`) or the mean R of all leaves below it (`"leaf_mean"`).
    The root of each group is the prompt. Edge advantage of node n with parent p and k siblings (n included):
    `baseline="parent_mean"` (the code's mode it calls "rloo"): V(n) - V(p), where p's mean includes n;
    `"leave_one_out"`: V(n) - mean of the other k - 1 siblings' V (0 for an only child). `std_normalize` (the
    code's "grpo" mode): divide by the population std of the k siblings' V + eps (eps = 1e-8 as the code).
    Edges whose advantage is exactly 0 (|V(n) - baseline| <= 1e-12 counts as 0: float rounding of equal values) are
    dropped (`drop_zero_edges`, the code's `only_adv_greater_than_zero`, which tests != 0): they get 0 and leave the
    whitening statistics. Probability mask and whitening as spo_chain (p >= threshold -> 0; mean / unbiased std over
    the kept tokens).
    Each edge its own sample: the code trains (parent text -> segment) pairs. Here a row is a root-to-leaf path,
    so an edge's tokens appear in every row below it, with identical context and log-probs. `edge_weight="once"`
    (default) divides the advantage of each occurrence by the number of rows through that node and weights the
    whitening statistics the same way, so the summed policy gradient equals training each edge once exactly;
    `"per_leaf"` gives every occurrence the full advantage (each edge weighted by its number of leaves).
    Deviations: the trainer's token-mean denominator counts every row's tokens (the code's counts each edge's
    kept tokens once), a constant per batch; no replay buffer (the code replays edges up to 8 iterations old, at
    most 32 per question: off-policy, not reproduced); rows without valid tokens are not part of any tree.
    Defaults: tree shape fan-out 6-6-6, M = 30-100 tokens per level in the code's configs (sampler options).
    """
    _check_prob(threshold)
    if value not in ("mean_of_means", "leaf_mean"):
        raise ValueError(f"value must be 'mean_of_means' or 'leaf_mean', got {value!r}")
    if baseline not in ("parent_mean", "leave_one_out"):
        raise ValueError(f"baseline must be 'parent_mean' or 'leave_one_out', got {baseline!r}")
    if edge_weight not in ("once", "per_leaf"):
        raise ValueError(f"edge_weight must be 'once' or 'per_leaf', got {edge_weight!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    mask = batch.response_mask
    gidx, G = group_index(batch.group_ids)
    tree = tree_structure(batch.tree_node, mask, gidx, G)
    V = tree_values(tree, batch.rewards, value)  # [N + G]
    edge = _edge_advantages(V, tree.parent, tree.N, G, baseline, std_normalize, eps)  # [N]
    on = tree.dense >= 0  # [B,T]
    idx = tree.dense.clamp_min(0)
    zero = torch.zeros(tree.dense.shape, dtype=torch.float64, device=mask.device)
    adv = torch.where(on, edge[idx], zero) if tree.N else zero  # [B,T]
    keep = on & (batch.logprobs.double().exp() < threshold) if prob_mask else on
    if drop_zero_edges:
        keep = keep & (adv != 0)
    w = torch.ones_like(adv)
    if edge_weight == "once" and tree.N:
        rows_through = torch.bincount(tree.path[tree.path >= 0], minlength=tree.N).to(torch.float64)  # [N]
        w = 1.0 / rows_through[idx].clamp_min(1)
    if whiten:
        adv = _weighted_whiten(adv, keep, w)
    adv = torch.where(keep, adv * w, zero).to(torch.float32)
    n_valid = max(int(mask.sum()), 1)
    return Credit(advantages=adv, metrics=advantage_metrics(
        adv, mask, tree_edges=float(tree.N), spo_masked_frac=float((mask & ~keep).sum()) / n_valid))


def _edge_advantages(V: Tensor, parent: Tensor, N: int, G: int, baseline: str, std_normalize: bool,
                     eps: float) -> Tensor:
    """Advantage of the edge into every node, float64 [N] (see spo_tree)."""
    if N == 0:
        return torch.zeros(0, dtype=torch.float64, device=V.device)
    ones = torch.ones(N, dtype=torch.float64, device=V.device)
    k = torch.zeros(N + G, dtype=torch.float64, device=V.device).index_add_(0, parent, ones)  # children per parent
    s = torch.zeros(N + G, dtype=torch.float64, device=V.device).index_add_(0, parent, V[:N])
    child_mean = (s / k.clamp_min(1))[parent]  # [N] mean of the siblings' values (n included)
    dev2 = torch.zeros(N + G, dtype=torch.float64, device=V.device).index_add_(0, parent, (V[:N] - child_mean) ** 2)
    sib_std = (dev2 / k.clamp_min(1)).sqrt()[parent]  # [N] population std, as np.std
    kn = k[parent]
    if baseline == "parent_mean":
        adv = V[:N] - V[parent]
    else:
        others = (kn * child_mean - V[:N]) / (kn - 1).clamp_min(1)
        adv = torch.where(kn > 1, V[:N] - others, torch.zeros_like(others))
    adv = torch.where(adv.abs() <= ZERO_EDGE, torch.zeros_like(adv), adv)  # equal values' rounding noise is 0
    if std_normalize:
        adv = adv / (sib_std + eps)
    return adv
