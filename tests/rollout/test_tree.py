"""Segment-tree rollouts (creditlab.rollout.tree) with the tiny policy: tree shape, shared real prefixes, per-token
signals equal to a teacher-forced recomputation, early-finished leaves, determinism, and training on trees."""

import json

import pytest
import torch

from creditlab import get_estimator
from creditlab.cli import main
from creditlab.credit.segment import tree_structure
from creditlab.policy import load_policy
from creditlab.rollout.hf import SamplingConfig, sequence_logprobs
from creditlab.rollout.tree import TreeRollout, parse_fanout
from creditlab.tasks import get_task
from creditlab.train.config import RolloutConfig


@pytest.fixture(scope="module")
def policy():
    return load_policy("tiny", seed=0)


def prompts(policy, n=2):
    return [policy.format_prompt(f"Compute step by step: start with {i + 1}, add 2.") for i in range(n)]


def segments(batch, b):
    """Row b's tokens grouped by tree node, in order: [(node, [ids])]."""
    out = []
    for t in range(batch.T):
        if batch.response_mask[b, t]:
            n = int(batch.tree_node[b, t])
            if not out or out[-1][0] != n:
                out.append((n, []))
            out[-1][1].append(int(batch.response_ids[b, t]))
    return out


def test_full_tree_shape_and_shared_prefixes(policy):
    batch = TreeRollout((3, 2), segment_len=4).sample(policy, prompts(policy), SamplingConfig(max_new_tokens=12),
                                                      seed=0)
    assert torch.bincount(batch.group_ids).tolist() == [6, 6]  # nothing finished early: 3 * 2 leaves per prompt
    for b in range(batch.B):
        segs = segments(batch, b)
        assert len(segs) == 2 and len(segs[0][1]) == 4  # first level: exactly M tokens, then the free last level
    for g in (0, 1):
        rows = (batch.group_ids == g).nonzero().flatten().tolist()
        firsts = {}
        for b in rows:
            node, ids = segments(batch, b)[0]
            assert firsts.setdefault(node, ids) == ids  # one node = one sampled segment, token for token
        assert len(firsts) == 3 and all(sum(segments(batch, b)[0][0] == n for b in rows) == 2 for n in firsts)
    gidx = torch.unique(batch.group_ids, return_inverse=True)[1]
    tree = tree_structure(batch.tree_node, batch.response_mask, gidx, 2)  # the ids form a tree
    assert tree.N == 2 * (3 + 6)
    meta = batch.meta["tree"]
    assert meta["generated_tokens"] < meta["leaf_tokens"] == int(batch.response_mask.sum())
    assert meta["generated_tokens"] == meta["leaf_tokens"] - 2 * 3 * 4  # each first segment is shared by 2 rows


def test_rollout_signals_match_a_teacher_forced_recomputation(policy):
    batch = TreeRollout((2, 2), segment_len=3).sample(policy, prompts(policy), SamplingConfig(max_new_tokens=9),
                                                      seed=1)
    logp, ent = sequence_logprobs(policy.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                  batch.response_mask, with_entropy=True)
    torch.testing.assert_close(batch.logprobs, logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch.entropies, ent, atol=1e-4, rtol=1e-4)
    text = policy.tokenizer.decode(batch.response_ids[0][batch.response_mask[0]].tolist(), skip_special_tokens=True)
    assert batch.texts[0] == text


def eos_heavy_tiny(p_eos=0.1):
    """tiny with a constant next-token distribution: EOS with probability `p_eos`, the other 99 ids uniform."""
    policy = load_policy("tiny", seed=0)
    V, d = policy.model.config.vocab_size, policy.model.config.hidden_size
    head = torch.nn.Linear(d, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[policy.tokenizer.eos_token_id] = float(torch.tensor(p_eos * (V - 1) / (1 - p_eos)).log())
    policy.model.lm_head = head
    return policy


def test_finished_segments_are_leaves_and_groups_are_ragged():
    policy = eos_heavy_tiny()
    eos = policy.tokenizer.eos_token_id
    # P(EOS within a 6-token segment) = 1 - .9^6 ~ 47%: many first-level nodes finish and are leaves
    batch = TreeRollout((4, 3), segment_len=6).sample(policy, prompts(policy, 8), SamplingConfig(max_new_tokens=20),
                                                      seed=3)
    early = 0
    for b in range(batch.B):
        segs = segments(batch, b)
        if len(segs) == 1:  # finished in the first level: its segment ends with EOS and nobody shares it
            early += 1
            assert segs[0][1][-1] == eos and len(segs[0][1]) <= 6
            assert int((batch.tree_node == segs[0][0]).any(dim=1).sum()) == 1
        else:
            assert len(segs[0][1]) == 6 and eos not in segs[0][1]
    assert early > 0 and batch.B == 8 * 4 * 3 - 2 * early
    sizes = torch.bincount(batch.group_ids)
    assert len(sizes) == 8 and sizes.min() < sizes.max() <= 12
    gidx = torch.unique(batch.group_ids, return_inverse=True)[1]
    tree_structure(batch.tree_node, batch.response_mask, gidx, 8)  # early leaves never continue


def test_deterministic_and_validated(policy):
    r = TreeRollout((2, 2), segment_len=3)
    a = r.sample(policy, prompts(policy), SamplingConfig(max_new_tokens=8), seed=5)
    b = r.sample(policy, prompts(policy), SamplingConfig(max_new_tokens=8), seed=5)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.tree_node, b.tree_node)
    with pytest.raises(ValueError, match="leaves no tokens"):
        TreeRollout((2, 2, 2), segment_len=4).sample(policy, prompts(policy), SamplingConfig(max_new_tokens=8), seed=0)
    with pytest.raises(ValueError, match="--tree-fanout"):
        parse_fanout("2,x")
    with pytest.raises(ValueError, match="--tree-fanout"):
        parse_fanout("2,0")
    with pytest.raises(ValueError, match="--tree-segment-len"):
        TreeRollout((2,), segment_len=0)


def test_collect_scores_leaves_and_tree_estimators_run(policy):
    task = get_task("arith_chain", n_steps=2)
    problems = task.problems("train", 2, 0)
    cfg = RolloutConfig(max_new_tokens=12, temperature=1.0)
    batch, scores = TreeRollout((2, 2), segment_len=4).collect(policy, task, problems, cfg, seed=0)
    assert len(scores) == batch.B and batch.rewards.tolist() == [s.reward for s in scores]
    batch = batch.replace(rewards=torch.arange(batch.B, dtype=torch.float32) % 2)  # some signal to credit
    for name, kw in (("spo_tree", {}), ("tempo", {}), ("treepo", {"segment_len": 4})):
        out = get_estimator(name)(batch, **kw).advantages
        assert torch.isfinite(out).all() and (out != 0).any(), name
    # tempo sees the real shared first segments: its TD term is nonzero exactly at branch points
    tempo = get_estimator("tempo")(batch).metrics["credit/branch_token_frac"]
    assert tempo > 0


def test_train_with_tree_rollouts(tmp_path):
    out = tmp_path / "spo_tree"
    args = ["--task", "arith_chain", "--task-kwargs", '{"n_steps": 2}', "--policy", "tiny", "--steps", "1",
            "--prompts-per-step", "2", "--max-new-tokens", "12", "--eval-problems", "2", "--no-tensorboard",
            "--no-progress", "--sample-every", "0", "--rollout", "tree", "--tree-fanout", "2,2",
            "--tree-segment-len", "4", "--estimator", "spo_tree", "--out-dir", str(out)]
    assert main(["train", *args]) == 0
    row = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["samples"] == 2 * 4 and row["credit/nonfinite"] == 0
