"""Monte-Carlo segment estimators (spo_chain, vineppo, spo_tree): hand cases from methods.md §4.4-4.6, loop
references on random ragged batches and random segment trees, telescoping / zero-sum properties, bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.loops.segment import loop_spo_chain, loop_spo_tree, loop_vineppo
from creditlab.credit.segment import segment_of_tokens, tree_structure, tree_values
from creditlab.sample import random_batch


def adv(name, batch, **kw):
    return get_estimator(name)(batch, **kw).advantages


def chain(p, cuts, values, R=1.0):
    """One response of len(p) tokens with sampling probabilities p and MC values at `cuts`."""
    T = len(p)
    return RolloutBatch(response_ids=torch.ones(1, T, dtype=torch.long),
                        response_mask=torch.ones(1, T, dtype=torch.bool),
                        group_ids=torch.zeros(1, dtype=torch.long), rewards=torch.tensor([R]),
                        logprobs=torch.tensor([p]).log(), mc_cuts=torch.tensor([cuts]),
                        mc_values=torch.tensor([values]))


def tree_batch(nodes, rewards, logp=-3.0, group_ids=None):
    """Rows given as lists of per-token node ids (ragged, right-padded)."""
    T = max(len(r) for r in nodes)
    node = torch.full((len(nodes), T), -1, dtype=torch.long)
    mask = torch.zeros(len(nodes), T, dtype=torch.bool)
    for b, r in enumerate(nodes):
        node[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = True
    gids = torch.tensor(group_ids or [0] * len(nodes))
    return RolloutBatch(response_ids=torch.where(mask, node + 3, 0), response_mask=mask, group_ids=gids,
                        rewards=torch.tensor(rewards, dtype=torch.float32),
                        logprobs=torch.where(mask, torch.full(node.shape, logp), 0.0), tree_node=node)


# ---------------------------------------------------------------- hand cases (methods.md)
def test_spo_chain_hand_case():
    # methods.md §4.4: p = [.5,.95,.95,.6,.95,.95], k = 1 -> low-prob {0,3}, cut points {-1, 2} = prefix lengths {0, 3}
    # V(-1) = .5, V(2) = .25, R = 1: before the mask [-.25]*3 + [.75]*3, after it [-.25,0,0,.75,0,0]
    b = chain([.5, .95, .95, .6, .95, .95], [0, 3], [.5, .25])
    out = adv("spo_chain", b, whiten=False, interval=1)
    assert out.tolist() == [[-0.25, 0.0, 0.0, 0.75, 0.0, 0.0]]
    unmasked = adv("spo_chain", b, whiten=False, prob_mask=False)
    assert unmasked.tolist() == [[-0.25, -0.25, -0.25, 0.75, 0.75, 0.75]]


def test_spo_chain_code_zero_first_segment_and_the_corrections():
    # methods.md §4.4: p_0 = .95 -> C = {2}; the code gives [0,0,0,.75,0,0]
    p = [.95, .95, .95, .6, .95, .95]
    code = chain(p, [3], [.25])
    assert adv("spo_chain", code, whiten=False, prompt_value="zero").tolist() == [[0, 0, 0, 0.75, 0, 0]]
    with pytest.raises(ValueError, match="no cut at 0"):
        adv("spo_chain", code, whiten=False)  # the default needs V(prompt)
    # corrected: segment 1 gets V(2) - V(prompt) = .25 - .5; masked tokens stay 0 (token 0 has p = .95 here)
    fixed = chain([.5, .95, .95, .6, .95, .95], [0, 3], [.5, .25])
    assert adv("spo_chain", fixed, whiten=False).tolist() == [[-0.25, 0, 0, 0.75, 0, 0]]
    # group_mean: V(prompt) = the group's mean reward (rows R = 1 and R = 0 -> .5), no prompt sample needed
    two = RolloutBatch(response_ids=torch.ones(2, 6, dtype=torch.long),
                       response_mask=torch.ones(2, 6, dtype=torch.bool),
                       group_ids=torch.zeros(2, dtype=torch.long), rewards=torch.tensor([1.0, 0.0]),
                       logprobs=torch.tensor([[.5, .95, .95, .6, .95, .95]] * 2).log(),
                       mc_cuts=torch.tensor([[3], [3]]), mc_values=torch.tensor([[.25], [.25]]))
    out = adv("spo_chain", two, whiten=False, prompt_value="group_mean", prob_mask=False)
    assert out[0].tolist() == [-0.25, -0.25, -0.25, 0.75, 0.75, 0.75]  # .25 - .5, then 1 - .25
    assert out[1].tolist() == [-0.25, -0.25, -0.25, -0.25, -0.25, -0.25]  # .25 - .5, then 0 - .25


def test_vineppo_hand_case_and_telescoping():
    # methods.md §4.6: V(s0) = .5, V(s1) = .25, V(s2) = 1, R = 1 -> A = [-.25, .75, 0]; Σ A = R - V(s0) = .5
    b = chain([.5] * 6, [0, 2, 4], [.5, .25, 1.0])
    out = adv("vineppo", b, whiten=False)
    assert out.tolist() == [[-0.25, -0.25, 0.75, 0.75, 0.0, 0.0]]
    step_sum = out[0, 0] + out[0, 2] + out[0, 4]
    assert step_sum.item() == pytest.approx(1.0 - 0.5)


def test_spo_tree_hand_cases():
    # methods.md §4.5: a parent with leaf children [1, 0, 1] -> A = [1/3, -2/3, 1/3], summing to 0
    b = tree_batch([[0, 1], [0, 2], [0, 3]], [1, 0, 1])
    out = adv("spo_tree", b, whiten=False, edge_weight="per_leaf")
    torch.testing.assert_close(out[:, 1], torch.tensor([1 / 3, -2 / 3, 1 / 3]))
    assert out[:, 0].tolist() == [0, 0, 0]  # the shared first segment has V = V(root): advantage 0, dropped
    # mean of means: root children {leaf R = 1, node with leaves [0,0,0,1]} -> V(root) = (1 + .25)/2 = .625;
    # the leaf mean would be 2/5 = .4
    mm = tree_batch([[0], [1, 2], [1, 3], [1, 4], [1, 5]], [1, 0, 0, 0, 1])
    gidx = torch.zeros(5, dtype=torch.long)
    tree = tree_structure(mm.tree_node, mm.response_mask, gidx, 1)
    assert tree_values(tree, mm.rewards, "mean_of_means")[-1].item() == pytest.approx(0.625)
    assert tree_values(tree, mm.rewards, "leaf_mean")[-1].item() == pytest.approx(0.4)
    # edges into the root's children: leaf 1 - .625 = .375, node .25 - .625 = -.375
    out = adv("spo_tree", mm, whiten=False, edge_weight="per_leaf")
    assert out[0, 0].item() == pytest.approx(0.375) and out[1, 0].item() == pytest.approx(-0.375)


def test_spo_tree_modes_on_the_hand_tree():
    b = tree_batch([[0, 1], [0, 2], [0, 3]], [1, 0, 1])
    # true leave-one-out: 1 - (0+1)/2 = .5, 0 - 1 = -1, .5
    loo = adv("spo_tree", b, whiten=False, edge_weight="per_leaf", baseline="leave_one_out")
    torch.testing.assert_close(loo[:, 1], torch.tensor([0.5, -1.0, 0.5]))
    # the code's "grpo": divided by np.std([1, 0, 1]) = sqrt(2)/3
    std = math.sqrt(2) / 3
    g = adv("spo_tree", b, whiten=False, edge_weight="per_leaf", std_normalize=True)
    torch.testing.assert_close(g[:, 1], torch.tensor([1 / 3, -2 / 3, 1 / 3]) / (std + 1e-8))
    # edge_weight="once": the shared segment's rows split each edge's weight; leaves are in one row each
    once = tree_batch([[0, 1], [0, 2], [3, 4]], [1, 0, 0])
    # root children: node 0 (V .5), node 3 (V 0); V(root) = .25 -> edge 0: +.25 shared by 2 rows, edge 3: -.25
    out = adv("spo_tree", once, whiten=False)
    assert out[:, 0].tolist() == pytest.approx([0.125, 0.125, -0.25])
    assert out[:, 1].tolist() == pytest.approx([0.5, -0.5, 0.0])  # node 4 is an only child: V = V(parent) -> 0


def test_spo_tree_probability_mask():
    b = tree_batch([[0, 1], [0, 2]], [1, 0])
    b = b.replace(logprobs=torch.tensor([[-0.01, -3.0], [-0.01, -0.05]]))  # p = .99, .05 / .99, .95
    out = adv("spo_tree", b, whiten=False, edge_weight="per_leaf")
    assert out.tolist() == [[0.0, 0.5], [0.0, 0.0]]


# ---------------------------------------------------------------- loop references
def random_tree_batch(seed, n_groups=3, max_fanout=3, max_levels=3, seg=3, holes=False):
    """Leaves of random segment trees: random fan-out per node, segments of 1..seg tokens, early finishes."""
    g = torch.Generator().manual_seed(seed)
    rows, groups = [], []
    next_id = [0]

    def new_id():
        next_id[0] += 1
        return next_id[0] * 7 + 100  # non-contiguous ids

    for gi in range(n_groups):
        frontier = [[]]
        for level in range(max_levels):
            nxt = []
            for path in frontier:
                for _ in range(int(torch.randint(1, max_fanout + 1, (1,), generator=g))):
                    p = [*path, (new_id(), int(torch.randint(1, seg + 1, (1,), generator=g)))]
                    if level == max_levels - 1 or bool(torch.rand(1, generator=g) < 0.25):  # finished: a leaf
                        rows.append(p)
                        groups.append(gi * 5 + 3)
                    else:
                        nxt.append(p)
            frontier = nxt
    tok_rows = [[n for n, k in path for _ in range(k)] for path in rows]
    if holes:  # a masked-out observation token in the middle of some rows
        tok_rows = [[*r[:2], None, *r[2:]] if len(r) > 2 and i % 2 else r for i, r in enumerate(tok_rows)]
    T = max(len(r) for r in tok_rows) + 1
    node = torch.full((len(rows), T), -1, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(tok_rows):
        for t, n in enumerate(r):
            if n is not None:
                node[b, t], mask[b, t] = n, True
            else:
                node[b, t] = 55  # junk under a masked token
    B = len(rows)
    logp = torch.where(mask, -torch.rand(B, T, generator=g) * 0.3, 0.0)  # p in (.74, 1): the mask bites
    rewards = torch.randint(0, 2, (B,), generator=g).float()
    batch = RolloutBatch(response_ids=torch.where(mask, node % 11, 0), response_mask=mask,
                         group_ids=torch.tensor(groups), rewards=rewards, logprobs=logp, tree_node=node)
    return batch.select(torch.randperm(B, generator=g)).validate()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), holes=st.booleans(), value=st.sampled_from(["mean_of_means", "leaf_mean"]),
       baseline=st.sampled_from(["parent_mean", "leave_one_out"]), std=st.booleans(),
       weight=st.sampled_from(["once", "per_leaf"]), whiten=st.booleans(), drop=st.booleans())
def test_spo_tree_matches_loop(seed, holes, value, baseline, std, weight, whiten, drop):
    batch = random_tree_batch(seed, holes=holes)
    kw = dict(value=value, baseline=baseline, std_normalize=std, edge_weight=weight, whiten=whiten,
              drop_zero_edges=drop)
    torch.testing.assert_close(adv("spo_tree", batch, **kw).double(), loop_spo_tree(batch, **kw),
                               atol=1e-5, rtol=1e-5)


def random_cut_batch(seed, T=12, n_groups=4, zero_first=False):
    """random_batch with random cut positions (not step starts): cut 0 always, unless `zero_first`."""
    batch = random_batch(n_groups=n_groups, max_group=4, T=T, seed=seed, empty_row_prob=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    L = batch.response_mask.sum(1)
    C = T
    cuts = torch.full((batch.B, C), -1, dtype=torch.long)
    values = torch.zeros(batch.B, C)
    for b in range(batch.B):
        pos = sorted({int(t) for t in torch.randint(0, max(int(L[b]), 1), (4,), generator=g)})
        pos = [p for p in pos if p < int(L[b])]
        if not zero_first and int(L[b]) > 0:
            pos = sorted({0, *pos})
        elif zero_first:
            pos = [p for p in pos if p > 0] if bool(torch.rand(1, generator=g) < 0.7) else pos
        cuts[b, : len(pos)] = torch.tensor(pos, dtype=torch.long)
        values[b, : len(pos)] = torch.rand(len(pos), generator=g)
    logp = torch.where(batch.response_mask, -torch.rand(batch.B, T, generator=g) * 0.25, 0.0)
    return batch.replace(mc_cuts=cuts, mc_values=values, logprobs=logp).validate()


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), mode=st.sampled_from(["mc", "group_mean", "zero"]), whiten=st.booleans(),
       prob_mask=st.booleans())
def test_spo_chain_matches_loop(seed, mode, whiten, prob_mask):
    batch = random_cut_batch(seed, zero_first=mode != "mc")
    kw = dict(prompt_value=mode, whiten=whiten, prob_mask=prob_mask)
    torch.testing.assert_close(adv("spo_chain", batch, **kw).double(), loop_spo_chain(batch, **kw),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), whiten=st.booleans())
def test_vineppo_matches_loop_and_telescopes(seed, whiten):
    batch = random_cut_batch(seed)
    out = adv("vineppo", batch, whiten=whiten).double()
    torch.testing.assert_close(out, loop_vineppo(batch, whiten=whiten), atol=1e-5, rtol=1e-5)
    if not whiten:  # Σ over steps (one token per step) = R - V(s_0)
        seg = segment_of_tokens(batch.mc_cuts, batch.T)
        for b in range(batch.B):
            if batch.response_mask[b].any():
                firsts = [int((seg[b] == j).nonzero()[0]) for j in range(int((batch.mc_cuts[b] >= 0).sum()))]
                total = sum(out[b, t].item() for t in firsts)
                assert total == pytest.approx(batch.rewards[b].item() - batch.mc_values[b, 0].item(), abs=1e-5)


def test_random_batch_fields_run_through_every_segment_estimator():
    batch = random_batch(n_groups=5, max_group=5, T=10, seed=7)
    for name, loop in (("spo_chain", loop_spo_chain), ("vineppo", loop_vineppo), ("spo_tree", loop_spo_tree)):
        torch.testing.assert_close(adv(name, batch).double(), loop(batch), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- properties
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_spo_tree_siblings_sum_to_zero_under_parent_mean(seed):
    batch = random_tree_batch(seed)
    out = adv("spo_tree", batch, whiten=False, prob_mask=False, drop_zero_edges=False, edge_weight="per_leaf")
    gidx = torch.unique(batch.group_ids, return_inverse=True)[1]
    tree = tree_structure(batch.tree_node, batch.response_mask, gidx, int(gidx.max()) + 1)
    edge = torch.zeros(tree.N + tree.G, dtype=torch.float64)
    on = tree.dense >= 0
    edge[tree.dense[on]] = out.double()[on]  # every token of a node carries its edge's advantage
    sums = torch.zeros(tree.N + tree.G, dtype=torch.float64).index_add_(0, tree.parent, edge[: tree.N])
    assert sums.abs().max() < 1e-5


def test_once_weighting_sums_each_edge_to_its_advantage():
    batch = random_tree_batch(3)
    once = adv("spo_tree", batch, whiten=False, prob_mask=False, drop_zero_edges=False)
    per_leaf = adv("spo_tree", batch, whiten=False, prob_mask=False, drop_zero_edges=False, edge_weight="per_leaf")
    node = batch.tree_node[batch.response_mask]
    for n in torch.unique(node).tolist():
        sel = (batch.tree_node == n) & batch.response_mask
        rows = sel.any(1).sum()
        assert once[sel].sum().item() == pytest.approx(per_leaf[sel].sum().item() / rows.item(), abs=1e-6)


def test_bad_trees_and_cuts_are_one_line_errors():
    with pytest.raises(ValueError, match="do not form a tree"):
        adv("spo_tree", tree_batch([[0, 1], [2, 1]], [1, 0]))  # node 1 under two parents
    with pytest.raises(ValueError, match="is a leaf"):
        adv("spo_tree", tree_batch([[0], [0, 1]], [1, 0]))  # node 0 ends row 0 and continues in row 1
    with pytest.raises(ValueError, match="past its response length"):
        adv("vineppo", chain([.5] * 4, [0, 3], [.5, .5]).replace(response_mask=torch.tensor([[1, 1, 1, 0]]).bool()))
    with pytest.raises(ValueError, match="strictly increasing"):
        chain([.5] * 3, [0, 2, 1], [.5, .5, .5]).validate()
    with pytest.raises(ValueError, match="threshold"):
        adv("spo_chain", chain([.5] * 3, [0], [.5]), threshold=0.0)
    with pytest.raises(ValueError, match="interval"):
        adv("spo_chain", chain([.5] * 3, [0], [.5]), interval=0)
    with pytest.raises(ValueError, match="mc_cuts"):
        get_estimator("vineppo")(chain([.5] * 3, [0], [.5]).replace(mc_cuts=None, mc_values=None))


def test_degenerate_inputs_are_finite():
    one = tree_batch([[4, 4, 4]], [1.0])  # a single leaf: V(leaf) = V(root), nothing to credit
    assert (adv("spo_tree", one) == 0).all()
    empty = chain([.5] * 3, [0], [.5]).replace(response_mask=torch.zeros(1, 3, dtype=torch.bool),
                                                mc_cuts=torch.tensor([[-1]]), mc_values=torch.tensor([[0.0]]))
    assert (adv("vineppo", empty) == 0).all() and (adv("spo_chain", empty) == 0).all()
    all_sure = chain([.99] * 4, [0, 2], [.5, .25])  # every token masked: all 0, whitening falls back, no NaN
    assert (adv("spo_chain", all_sure) == 0).all()
