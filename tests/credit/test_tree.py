"""Prefix-tree estimators (tempo, treepo): hand-computed cases (methods.md §4.1-4.2), loop references over many
random ragged batches, trie properties (telescoping, gating, reduction to GRPO) and degenerate groups."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.loops.tree import loop_tempo, loop_treepo
from creditlab.credit.ops import compact_left, group_index, masked_whiten
from creditlab.credit.tree import prefix_nodes
from creditlab.sample import random_batch


def make(rows, rewards, group_ids=None, T=None):
    """A batch from explicit token lists (right-padded with 0)."""
    T = T or max(max(len(r) for r in rows), 1)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[b, : len(r)] = True
    gids = torch.tensor(group_ids if group_ids is not None else [0] * len(rows))
    return RolloutBatch(response_ids=ids, response_mask=mask, group_ids=gids,
                        rewards=torch.tensor(rewards, dtype=torch.float32))


batches = st.builds(
    random_batch,
    n_groups=st.integers(1, 5), max_group=st.integers(1, 6), T=st.integers(1, 10), vocab=st.integers(2, 4),
    seed=st.integers(0, 10_000), binary_rewards=st.booleans(), empty_row_prob=st.sampled_from([0.0, 0.3]),
)


def _pad(batch, extra, junk_seed):
    """Required fields only, `extra` padding columns appended and every padding token replaced by junk ids."""
    g = torch.Generator().manual_seed(junk_seed)
    mask = torch.cat([batch.response_mask, torch.zeros(batch.B, extra, dtype=torch.bool)], 1)
    ids = torch.cat([batch.response_ids, torch.zeros(batch.B, extra, dtype=torch.long)], 1)
    ids = torch.where(mask, ids, torch.randint(0, 4, ids.shape, generator=g))
    return RolloutBatch(response_ids=ids, response_mask=mask, group_ids=batch.group_ids, rewards=batch.rewards)


def tempo(batch, **kw):
    return get_estimator("tempo")(batch, **kw).advantages


def grpo(batch, **kw):
    return get_estimator("grpo")(batch, **kw).advantages


def rows_of(batch):
    return [tuple(batch.response_ids[b][batch.response_mask[b]].tolist()) for b in range(batch.B)]


# ---------------------------------------------------------------- hand-computed cases
HAND_TEMPO = make([[5, 7, 9], [5, 7, 8], [5, 6], [4]], [1, 0, 1, 0])


def test_tempo_hand_case():
    c = get_estimator("tempo")(HAND_TEMPO)
    expected = torch.tensor([[1.1547, 0.5774, 1.7321], [-0.5774, -1.1547, -1.7321],
                             [1.1547, 1.4434, 0.0], [-1.7321, 0.0, 0.0]])
    torch.testing.assert_close(c.advantages, expected, atol=1e-4, rtol=0)
    delta = c.advantages - grpo(HAND_TEMPO)
    torch.testing.assert_close(delta, torch.tensor([[0.2887, -0.2887, 0.8660], [0.2887, -0.2887, -0.8660],
                                                    [0.2887, 0.5774, 0.0], [-0.8660, 0.0, 0.0]]), atol=1e-4, rtol=0)
    assert c.metrics["credit/branch_token_frac"] == 1.0  # every token of this tiny trie sits below a branch


def test_tempo_gate_root_drops_only_the_first_token_term():
    gated = tempo(HAND_TEMPO, gate_root=True)
    full = tempo(HAND_TEMPO)
    base = grpo(HAND_TEMPO)
    assert torch.equal(gated[:, 0], base[:, 0])
    assert torch.equal(gated[:, 1:], full[:, 1:])


def test_tempo_td_coef_scales_delta():
    base = grpo(HAND_TEMPO)
    d1 = tempo(HAND_TEMPO) - base
    torch.testing.assert_close(tempo(HAND_TEMPO, td_coef=0.5) - base, 0.5 * d1, atol=1e-6, rtol=0)
    assert torch.equal(tempo(HAND_TEMPO, td_coef=0.0), base)


HAND_TREEPO = make([[0, 0], [0, 1], [1, 0], [1, 1]], [1, 0, 1, 1])


def test_treepo_hand_case():
    est = get_estimator("treepo")
    a = est(HAND_TREEPO, segment_len=1, whiten=False).advantages
    torch.testing.assert_close(a[:, 0], torch.tensor([0.375, -0.625, 0.125, 0.125]), atol=1e-7, rtol=0)
    assert torch.equal(a[:, 0], a[:, 1])  # per-row scalar, broadcast
    a = est(HAND_TREEPO, segment_len=1, whiten=False, remove_no_std_subgroup=True).advantages
    torch.testing.assert_close(a[:, 0], torch.tensor([0.375, -0.625, 0.25, 0.25]), atol=1e-7, rtol=0)
    # group_size weights: depth 0 (size 4) and depth 1 (size 2): (4 c0 + 2 c1) / 6
    a = est(HAND_TREEPO, segment_len=1, whiten=False, weight="group_size").advantages
    torch.testing.assert_close(a[:, 0], torch.tensor([1 / 3, -2 / 3, 1 / 6, 1 / 6]), atol=1e-7, rtol=0)
    w = est(HAND_TREEPO, segment_len=1).advantages
    raw = est(HAND_TREEPO, segment_len=1, whiten=False).advantages
    torch.testing.assert_close(w, masked_whiten(raw, HAND_TREEPO.response_mask))
    # segment_len=2: each path is one label -> depth 1 subgroups are singletons -> depth 0 only
    a = est(HAND_TREEPO, segment_len=2, whiten=False).advantages
    torch.testing.assert_close(a[:, 0], torch.tensor([0.25, -0.75, 0.25, 0.25]), atol=1e-7, rtol=0)


def test_treepo_row_ending_at_an_inner_node_shares_that_subtree():
    # [5,7] ends where [5,7,9] continues: at depth 2 they form the subgroup {0, 1} (as the reference's paths)
    b = make([[5, 7], [5, 7, 9], [4, 1, 1]], [1, 0, 0])
    a = get_estimator("treepo")(b, segment_len=1, whiten=False).advantages[:, 0]
    # row 0: depth 0: 1 - 1/3; depth 1 {0,1}: .5; depth 2 {0,1}: .5  -> mean
    torch.testing.assert_close(a, torch.tensor([(2 / 3 + 0.5 + 0.5) / 3, (-1 / 3 - 0.5 - 0.5) / 3, -1 / 3]),
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------- loop references
def _batch(seed, T=None):
    # tiny vocab so that prefixes are shared; ragged groups, singletons, empty rows, zero-variance groups
    return random_batch(n_groups=1 + seed % 5, max_group=6, T=T or 1 + seed % 9, vocab=2 + seed % 3, seed=seed,
                        binary_rewards=seed % 2 == 0, empty_row_prob=0.15)


TEMPO_KW = [{}, {"gate_root": True}, {"td_coef": 0.3, "singleton": "raw"}, {"eps": 1e-3}]


@pytest.mark.parametrize("kw", TEMPO_KW)
def test_tempo_matches_loop(kw):
    for seed in range(80):
        b = _batch(seed)
        torch.testing.assert_close(tempo(b, **kw).double(), loop_tempo(b, **kw), atol=2e-5, rtol=1e-5,
                                   msg=f"seed {seed}")


def test_tempo_matches_loop_with_holes_in_the_mask():
    for seed in range(30):
        b = _batch(seed, T=12)
        holes = torch.rand(b.response_mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.2
        mask = b.response_mask & ~holes
        b = b.replace(response_mask=mask, step_ids=torch.where(mask, b.step_ids, -1),
                      turn_ids=torch.where(mask, b.turn_ids, -1))
        torch.testing.assert_close(tempo(b).double(), loop_tempo(b), atol=2e-5, rtol=1e-5)


TREEPO_KW = [{"segment_len": 1}, {"segment_len": 2, "weight": "group_size"},
             {"segment_len": 1, "remove_no_std_subgroup": True, "whiten": False},
             {"segment_len": 3, "max_depth": 2, "singleton": "raw", "whiten": False},
             {"segment_len": 1, "max_depth": 1, "weight": "group_size", "remove_no_std_subgroup": True}, {}]


@pytest.mark.parametrize("kw", TREEPO_KW)
def test_treepo_matches_loop(kw):
    for seed in range(80):
        b = _batch(seed)
        got = get_estimator("treepo")(b, **kw).advantages.double()
        torch.testing.assert_close(got, loop_treepo(b, **kw), atol=2e-5, rtol=1e-5, msg=f"seed {seed}")


def test_prefix_nodes_match_brute_force():
    for seed in range(40):
        b = _batch(seed, T=7)
        order, cmask = compact_left(b.response_mask)
        ids = b.response_ids.gather(1, order)
        gidx, _ = group_index(b.group_ids)
        node = prefix_nodes(ids, cmask, gidx)
        seqs = rows_of(b)
        for i in range(b.B):
            for j in range(b.B):
                for t in range(min(len(seqs[i]), len(seqs[j]))):
                    same = bool(gidx[i] == gidx[j]) and seqs[i][: t + 1] == seqs[j][: t + 1]
                    assert (node[i, t] == node[j, t]) == same
                for u in range(len(seqs[j])):  # different depths never share a node
                    for t in range(len(seqs[i])):
                        if t != u:
                            assert node[i, t] != node[j, u]


# ---------------------------------------------------------------- trie properties
def _branch_positions(batch):
    """[B,T] True at tokens whose parent node branches (>= 2 children, or a response of the group ends there)."""
    seqs, out = rows_of(batch), torch.zeros(batch.response_ids.shape, dtype=torch.bool)
    groups = batch.group_ids.tolist()
    for i in range(batch.B):
        cols = [t for t in range(batch.T) if batch.response_mask[i, t]]
        for k, t in enumerate(cols):
            prefix = seqs[i][:k]
            peers = [s for j, s in enumerate(seqs) if groups[j] == groups[i] and s[:k] == prefix]
            children = {s[k] for s in peers if len(s) > k}
            out[i, t] = len(children) > 1 or any(len(s) == k for s in peers)
    return out


@given(batch=batches)
def test_tempo_differs_from_grpo_only_at_branch_tokens(batch):
    diff = tempo(batch) != grpo(batch)
    assert not (diff & ~_branch_positions(batch)).any()


@given(batch=batches)
def test_tempo_telescopes_to_the_grpo_advantage(batch):
    delta = (tempo(batch).double() - grpo(batch).double())
    seqs, groups = rows_of(batch), batch.group_ids.tolist()
    a = grpo(batch)
    for i in range(batch.B):
        # a leaf: no other response of the group equals or extends it (EOS guarantees this in real rollouts)
        leaf = sum(1 for j in range(batch.B) if groups[j] == groups[i] and seqs[j][: len(seqs[i])] == seqs[i]) == 1
        if leaf and seqs[i]:
            first = batch.response_mask[i].nonzero()[0, 0]
            assert float(delta[i].sum()) == pytest.approx(float(a[i, first]), abs=1e-4)


@given(batch=batches)
def test_identical_responses_give_grpo(batch):
    same = batch.response_ids[:1].expand_as(batch.response_ids).clone()
    b = batch.replace(response_ids=same, response_mask=torch.ones_like(batch.response_mask),
                      step_ids=None, step_rewards=None, step_labels=None, mc_values=None)
    assert torch.equal(tempo(b), grpo(b))
    assert get_estimator("tempo")(b).metrics["credit/branch_token_frac"] == 0.0


def _distinct_first_tokens(batch):
    order, _ = compact_left(batch.response_mask)
    first = order[:, 0]  # column of each row's first valid token
    ids = batch.response_ids.scatter(1, first[:, None], (1000 + torch.arange(batch.B))[:, None])
    return batch.replace(response_ids=torch.where(batch.response_mask, ids, batch.response_ids))


@given(batch=batches)
def test_tempo_gate_root_equals_grpo_without_shared_first_tokens(batch):
    b = _distinct_first_tokens(batch)
    assert torch.equal(tempo(b, gate_root=True), grpo(b))
    assert torch.equal(tempo(b, gate_root=True, singleton="raw"), grpo(b, singleton="raw"))


@given(batch=batches)
def test_treepo_without_shared_first_tokens_is_reinforce_pp(batch):
    b = _distinct_first_tokens(batch)
    torch.testing.assert_close(get_estimator("treepo")(b, segment_len=1).advantages,
                               get_estimator("reinforce_pp")(b).advantages, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kw", [("tempo", {}), ("treepo", {"segment_len": 1}),
                                     ("treepo", {"segment_len": 2, "weight": "group_size"})])
@given(batch=batches, extra=st.integers(0, 5), junk=st.integers(0, 99), seed=st.integers(0, 999))
def test_padding_and_permutation_invariance_with_deep_trees(name, kw, batch, extra, junk, seed):
    est = get_estimator(name)
    batch = _pad(batch, 0, junk)
    base = est(batch, **kw).advantages
    padded = est(_pad(batch, extra, junk), **kw).advantages
    torch.testing.assert_close(padded[:, : batch.T], base, atol=1e-5, rtol=1e-5)
    perm = torch.randperm(batch.B, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(est(batch.select(perm), **kw).advantages, base[perm], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- degenerate groups and arguments
def test_degenerate_groups():
    # group 0: branching; group 7: singleton (R=.7); group 9: constant rewards; last row: all padding in group 0
    b = make([[1, 2], [1, 3], [2], [4, 4, 4], [1, 1], [1, 2], [2, 2], []], [1, 0, 1, 0.7, 0.1, 0.1, 0.1, 0.0],
             [0, 0, 0, 7, 9, 9, 9, 0], T=3)
    adv = tempo(b)
    assert (adv[3] == 0).all() and (adv[4:7] == 0).all() and (adv[7] == 0).all()
    assert torch.equal(tempo(b, singleton="raw")[3], grpo(b, singleton="raw")[3])
    tp = get_estimator("treepo")(b, segment_len=1, whiten=False).advantages
    assert (tp[3] == 0).all() and (tp[4:7] == 0).all() and (tp[7] == 0).all()
    raw = get_estimator("treepo")(b, segment_len=1, whiten=False, singleton="raw").advantages
    assert raw[3, :3].tolist() == pytest.approx([0.7] * 3)
    for kw in ({}, {"segment_len": 1}):
        assert torch.isfinite(get_estimator("treepo")(b, **kw).advantages).all()


def test_treepo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="segment_len"):
        get_estimator("treepo")(HAND_TREEPO, segment_len=0)
    with pytest.raises(ValueError, match="weight"):
        get_estimator("treepo")(HAND_TREEPO, weight="mean")
    with pytest.raises(ValueError, match="singleton"):
        get_estimator("tempo")(HAND_TREEPO, singleton="nan")
