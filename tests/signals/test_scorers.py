"""Step scorers (signals/prm.py, signals/implicit.py): registry, oracle, discriminative PRM, judge, implicit PRM."""

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaForCausalLM, LlamaForTokenClassification

from creditlab.batch import RolloutBatch
from creditlab.policy import load_policy, tiny_config, tiny_tokenizer
from creditlab.signals.implicit import (
    ImplicitPRMScorer,
    implicit_q,
    oprl_loss,
    prime_loss,
    trajectory_q,
)
from creditlab.signals.prm import (
    JudgeScorer,
    OracleScorer,
    PRMScorer,
    StepScorer,
    get_scorer,
    is_online,
    list_scorers,
    parse_critique,
    produce_step_signals,
    register_scorer,
    vote_steps,
)
from creditlab.signals.produce import SignalContext, produce_signals
from creditlab.tasks import Problem, get_task

THREE_STEPS = "1 + 2 = 3\n3 * 2 = 6\n6 - 1 = 5"


def batch_from_texts(tokenizer, texts, group_ids=None):
    """Right-padded RolloutBatch of the encoded texts, each followed by EOS, with one padding column."""
    rows = [[*tokenizer.encode(t, add_special_tokens=False), tokenizer.eos_token_id] for t in texts]
    T = max(len(r) for r in rows) + 1
    ids = torch.full((len(rows), T), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), True
    groups = torch.arange(len(rows)) if group_ids is None else torch.tensor(group_ids)
    return RolloutBatch(response_ids=ids, response_mask=mask, group_ids=groups, rewards=torch.zeros(len(rows)),
                        texts=list(texts))


def char_ctx(problems=(), scores=()):
    return SimpleNamespace(policy=SimpleNamespace(tokenizer=tiny_tokenizer()), problems=list(problems),
                           scores=list(scores))


# ------------------------------------------------------------------ registry
def test_registry():
    assert {"oracle", "prm", "judge", "implicit"} <= set(list_scorers())
    with pytest.raises(KeyError, match="oracle"):
        get_scorer("no-such-scorer")
    with pytest.raises(ValueError, match="already registered"):
        register_scorer("oracle")(OracleScorer)
    assert isinstance(get_scorer("oracle"), StepScorer)
    assert not is_online(get_scorer("oracle")) and is_online(get_scorer("implicit"))


# ------------------------------------------------------------------ oracle
@pytest.fixture()
def arith():
    task = get_task("arith_chain", n_steps=3, max_operand=5)
    problem = task.problems("train", 1, seed=1)[0]
    gold = task.demonstration(problem)
    lines = gold.split("\n")
    wrong = "\n".join([lines[0], lines[1].rsplit("=", 1)[0] + "= 999", lines[2], lines[3]])
    texts = [gold, wrong, "no steps here"]
    batch = batch_from_texts(tiny_tokenizer(), texts, group_ids=[0, 0, 0])
    return batch, char_ctx([problem], [task.score(problem, t) for t in texts])


def test_oracle_labels_and_zero_step_padding(arith):
    batch, ctx = arith
    out = produce_step_signals(batch, get_scorer("oracle"), ctx)
    # the wrong result in step 2 does not spoil step 3, which still carries the gold value (arith_chain labels)
    assert out.step_rewards.tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert (out.step_ids[2] == -1).all()  # the zero-step row: no step tokens, all-padding rewards
    out.validate()


def test_oracle_zero_steps_everywhere_gives_one_column():
    task = get_task("arith_chain")
    problem = task.problems("train", 1, seed=0)[0]
    batch = batch_from_texts(tiny_tokenizer(), ["nothing", ""])
    ctx = char_ctx([problem, problem], [task.score(problem, t) for t in batch.texts])
    out = produce_step_signals(batch, get_scorer("oracle"), ctx)
    assert out.step_rewards.shape == (2, 1) and out.step_rewards.abs().sum() == 0
    out.validate()


def test_oracle_noise_bias_and_default_producer(arith):
    batch, ctx = arith
    flipped = get_scorer("oracle", noise=1.0).score_steps(batch, ctx)
    assert flipped.tolist() == [[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]  # padding stays 0
    a = get_scorer("oracle", noise=0.3, seed=5).score_steps(batch, ctx)
    b = get_scorer("oracle", noise=0.3, seed=5).score_steps(batch, ctx)
    assert torch.equal(a, b)
    biased = get_scorer("oracle", bias=0.25)
    assert biased.score_steps(batch, ctx)[1].tolist() == [1.25, 0.25, 1.25] and biased.scale == (0.25, 1.25)
    via_registry = produce_signals(batch, ["step_rewards"], SignalContext(ctx.policy, ctx.problems, ctx.scores))
    assert via_registry.step_rewards[1].tolist() == [1.0, 0.0, 1.0]


def test_oracle_hackable_rewards_form_not_truth():
    batch = batch_from_texts(tiny_tokenizer(), ["1 + 1 = 5\nlet me think\n2 * 2 = 4.\nAnswer: 9"])
    out = produce_step_signals(batch, get_scorer("oracle", hackable=True), char_ctx())
    assert out.step_rewards.tolist() == [[1.0, 0.0, 1.0, 0.0]]
    out.validate()


# ------------------------------------------------------------------ discriminative PRM
def prm_tokenizer():
    tok = tiny_tokenizer()
    tok.add_tokens(["ки"])
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    return tok


def tiny_prm(kind="causal"):
    tok = prm_tokenizer()
    cfg = tiny_config(len(tok), n_layers=1, d_model=32, n_heads=2)
    torch.manual_seed(0)
    if kind == "causal":
        return LlamaForCausalLM(cfg), tok
    cfg.num_labels = 2
    return LlamaForTokenClassification(cfg), tok


@pytest.mark.parametrize("convention,kind", [("math_shepherd", "causal"), ("qwen", "token_classification")])
def test_prm_three_steps_three_scores(convention, kind):
    model, tok = tiny_prm(kind)
    scorer = get_scorer("prm", model=model, tokenizer=tok, convention=convention)
    ctx = char_ctx([Problem("Compute 1 + 2, times 2, minus 1.", "5")])
    texts = [THREE_STEPS, THREE_STEPS.replace("= 6", "= 6 <extra_0>"), "", "only one step"]
    batch = batch_from_texts(tiny_tokenizer(), texts, group_ids=[0, 0, 0, 0])
    out = produce_step_signals(batch, scorer, ctx)
    assert out.step_rewards.shape == (4, 3)
    assert ((out.step_rewards[:2] > 0) & (out.step_rewards[:2] < 1)).all()  # exactly 3 probabilities each
    assert out.step_rewards[2].abs().sum() == 0 and (out.step_rewards[3, 1:] == 0).all()
    assert torch.allclose(out.step_rewards[0, 0], out.step_rewards[1, 0])  # same prefix, same first score
    assert scorer.metrics().get("scorer/tags_stripped", 0) == (1 if convention == "qwen" else 0)
    assert scorer.prm_input("q", ["a " + scorer.tag, "b"]).count(scorer.tag) == 2  # one tag per step, no more
    assert scorer.scale == (0.0, 1.0)
    out.validate()


def test_prm_signed_scale_and_local_directory(tmp_path):
    model, tok = tiny_prm("token_classification")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    scorer = get_scorer("prm", path=str(tmp_path), convention="qwen", signed=True)
    assert scorer.scale == (-1.0, 1.0)
    scores = scorer.score_steps(batch_from_texts(tiny_tokenizer(), [THREE_STEPS]), char_ctx())
    assert scores.shape == (1, 3) and ((scores > -1) & (scores < 1)).all()


def test_prm_nan_becomes_neutral_and_is_counted():
    model, tok = tiny_prm("causal")
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    scorer = get_scorer("prm", model=model, tokenizer=tok, convention="math_shepherd")
    scores = scorer.score_steps(batch_from_texts(tiny_tokenizer(), [THREE_STEPS]), char_ctx())
    assert scores.tolist() == [[0.5, 0.5, 0.5]]
    assert scorer.metrics()["scorer/nan_count"] == 3
    assert scorer.metrics() == {}  # counts are since the last call


def test_prm_convention_mismatch_and_tag_checks():
    model, tok = tiny_prm("causal")
    scorer = PRMScorer(model=model, tokenizer=tok, convention="qwen")  # a causal LM has no 2-class head
    with pytest.raises(ValueError, match="2-class head"):
        scorer.score_steps(batch_from_texts(tiny_tokenizer(), [THREE_STEPS]), char_ctx())
    with pytest.raises(ValueError, match="convention"):
        PRMScorer(model=model, tokenizer=tok, convention="shepherd")
    multi = PRMScorer(model=model, tokenizer=tok, convention="math_shepherd", tag="<<tag>>")  # 7 char tokens
    with pytest.raises(ValueError, match="not a single token"):
        multi.score_steps(batch_from_texts(tiny_tokenizer(), [THREE_STEPS]), char_ctx())


# ------------------------------------------------------------------ judge
def test_parse_critique():
    assert parse_critique("Wrong steps: 2, 3", 3) == {1, 2}
    assert parse_critique("blah\nwrong step: none.", 3) == set()
    assert parse_critique("Incorrect steps: 1 and 9", 3) == {0}
    assert parse_critique("Step 2 is incorrect because 3*2 != 7", 3) == {1}
    assert parse_critique("All steps are correct.", 3) == set()
    for garbage in ("", "asdf qwer", "Wrong steps:", "Wrong steps: 7", "\x00\x01"):
        assert parse_critique(garbage, 3) is None


def test_votes():
    verdicts = [{1}, {1, 2}, set()]
    assert vote_steps(verdicts, 3, "intersection") == [1.0, 1.0, 1.0]
    assert vote_steps(verdicts, 3, "majority") == [1.0, 0.0, 1.0]
    assert vote_steps(verdicts, 3, "union") == [1.0, 0.0, 0.0]
    assert vote_steps([], 3, "union") == [1.0, 1.0, 1.0]  # no verdict: nothing flagged


@given(st.lists(st.sets(st.integers(0, 4)), min_size=1, max_size=5))
def test_vote_nesting(verdicts):
    flagged = {r: {j for j, s in enumerate(vote_steps(verdicts, 5, r)) if s == 0.0}
               for r in ("intersection", "majority", "union")}
    assert flagged["intersection"] <= flagged["majority"] <= flagged["union"]


def test_judge_with_stub_verdicts_and_garbage():
    calls = []

    def stub(prompts, k):
        calls.append(prompts)
        return [["Wrong steps: 2", "wrong steps: 2, 3", "Wrong steps: none"][:k] for _ in prompts]

    batch = batch_from_texts(tiny_tokenizer(), [THREE_STEPS, ""])
    ctx = char_ctx([Problem("q?", "5"), Problem("q2?", "1")])
    union = get_scorer("judge", generate_fn=stub, k=3, vote="union")
    assert union.score_steps(batch, ctx).tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert len(calls[0]) == 1 and "Step 3: 6 - 1 = 5" in calls[0][0] and "q?" in calls[0][0]
    majority = get_scorer("judge", generate_fn=stub, k=3, vote="majority")
    assert majority.score_steps(batch, ctx)[0].tolist() == [1.0, 0.0, 1.0]

    def garbage(prompts, k):
        return [["\x00 ### ???", "Wrong steps:", None][:k] for _ in prompts]

    judge = get_scorer("judge", generate_fn=garbage, k=3)
    scores = judge.score_steps(batch, ctx)
    assert scores.tolist() == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]  # no verdict -> not flagged
    m = judge.metrics()
    assert m["scorer/unparseable"] == 3 and m["scorer/no_verdict"] == 1 and m["scorer/critiques"] == 3


def test_judge_with_real_tiny_model():
    policy = load_policy("tiny", seed=0)
    judge = JudgeScorer(policy=policy, k=2, vote="intersection", max_new_tokens=6, temperature=1.0)
    batch = batch_from_texts(policy.tokenizer, [THREE_STEPS, "1 + 1 = 2"], group_ids=[0, 0])
    ctx = SimpleNamespace(policy=policy, problems=[Problem("Compute.", "5")], scores=[])
    out = produce_step_signals(batch, judge, ctx)
    assert out.step_rewards.shape == (2, 3) and torch.isfinite(out.step_rewards).all()
    assert set(out.step_rewards.unique().tolist()) <= {0.0, 1.0}
    m = judge.metrics()
    assert m["scorer/critiques"] == 4 and m.get("scorer/unparseable", 0) <= 4
    out.validate()


# ------------------------------------------------------------------ implicit PRM
def test_oprl_hand_case_and_pairs():
    loss, n = oprl_loss(torch.tensor([0.3, 0.1]), torch.tensor([True, False]), torch.tensor([0, 0]))
    assert n == 1 and loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), abs=1e-6)
    assert loss.item() == pytest.approx(0.5981, abs=1e-4)
    q = torch.tensor([0.3, 0.5, 0.1, 0.2, 0.9, 0.0])
    succ = torch.tensor([True, True, False, True, False, False])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    loss, n = oprl_loss(q, succ, groups)
    pairs = [(i, j) for i in range(6) for j in range(6) if groups[i] == groups[j] and succ[i] and not succ[j]]
    ref = sum(-math.log(1 / (1 + math.exp(-(q[i] - q[j]).item()))) for i, j in pairs) / len(pairs)
    assert n == len(pairs) == 3 and loss.item() == pytest.approx(ref, abs=1e-6)
    loss, n = oprl_loss(q[:3], torch.tensor([True, True, True]), groups[:3])
    assert n == 0 and loss.item() == 0.0


def test_prime_loss_and_trajectory_q():
    q = torch.zeros(2, 3)
    assert prime_loss(q, torch.tensor([1.0, 0.0]), beta=0.05).item() == pytest.approx(math.log(2))
    traj = trajectory_q(torch.tensor([[0.2, 0.4], [0.0, 0.0]]), torch.tensor([2, 0]), torch.tensor([9.0, 0.7]))
    assert traj.tolist() == pytest.approx([0.3, 0.7])  # a row with no steps counts as one step
    assert implicit_q(torch.ones(1, 2), torch.zeros(1, 2), torch.tensor([[True, False]])).tolist() == [[1.0, 0.0]]


@pytest.fixture(scope="module")
def rollout():
    from creditlab.rollout.hf import SamplingConfig, generate

    policy = load_policy("tiny", seed=0)
    batch = generate(policy, ["1 + 2 =\n", "3 * 3 =\n"], 4, SamplingConfig(max_new_tokens=12), seed=0)
    correct = [True, False, True, False, False, True, True, False]
    half = (batch.response_mask.sum(1, keepdim=True) + 1) // 2  # two steps per response: first/second half
    cols = torch.arange(batch.T)[None, :]
    step_ids = torch.where(batch.response_mask, (cols >= half).long(), torch.full_like(cols, -1))
    batch = batch.replace(rewards=torch.tensor(correct, dtype=torch.float32), step_ids=step_ids)
    ctx = SimpleNamespace(policy=policy, problems=[], scores=[SimpleNamespace(correct=c) for c in correct])
    return policy, batch, ctx


def test_implicit_is_zero_at_init_and_fills_fields(rollout):
    _, batch, ctx = rollout
    scorer = get_scorer("implicit")  # copies ctx.policy.model at the first call
    out = produce_step_signals(batch.replace(step_ids=None), scorer, ctx)
    assert torch.equal(out.prm_logprobs, out.ref_logprobs)
    assert out.step_rewards.abs().max().item() == 0.0  # q ≡ 0 at initialisation
    assert scorer.beta == 0.05 and scorer.lr == 1e-6
    out.validate()


@pytest.mark.parametrize("mode", ["prime", "oprl"])
def test_one_update_separates_correct_from_wrong(rollout, mode):
    policy, batch, ctx = rollout
    before = [p.detach().clone() for p in policy.model.parameters()]
    scorer = ImplicitPRMScorer(policy, mode=mode, lr=1e-3)
    # prime: pi_ref is a frozen copy, q == 0 exactly; oprl: pi_ref is the rollout policy (batch.logprobs from
    # sampling at temperature 1), equal to pi_phi up to the sampler's float noise
    assert scorer.score_steps(batch, ctx).abs().max().item() <= (0.0 if mode == "prime" else 1e-5)
    logs = scorer.update(batch, ctx)
    assert math.isfinite(logs["implicit/loss"]) and logs["implicit/grad_norm"] > 0
    prm_logp, ref_logp = scorer.logprobs(batch)
    whole = scorer.beta * implicit_q(prm_logp, ref_logp, batch.response_mask).sum(1)
    right = batch.rewards > 0.5
    assert whole[right].mean() > whole[~right].mean()  # the implicit reward now prefers correct responses
    rewards = scorer.score_steps(batch, ctx)
    assert rewards.shape == (batch.B, 2) and torch.isfinite(rewards).all() and rewards.abs().sum() > 0
    assert torch.allclose(rewards.sum(1), whole, atol=1e-6)  # all valid tokens are in a step here
    assert all(torch.equal(a, b) for a, b in zip(before, policy.model.parameters()))  # the policy is untouched
    if mode == "oprl":
        assert logs["implicit/pairs"] == 8  # 2 successes x 2 failures in each of the two groups


def test_oprl_scorer_divides_by_the_rollout_policy(rollout):
    """iStar (ref_path=null): q = log pi_phi - batch.logprobs (old policy), no frozen model, no ref_logprobs."""
    policy, batch, ctx = rollout
    scorer = ImplicitPRMScorer(policy, mode="oprl")
    assert scorer.reference == "old_policy" and scorer.ref is None
    shifted = batch.replace(logprobs=torch.where(batch.response_mask, batch.logprobs - 0.5, 0.0))
    # with the policy in the context, pi_old is recomputed by the same forward (verl's old_log_prob) and replaces
    # the batch's: pi_phi = pi_old at initialisation, so q and every step reward are exactly 0
    out = produce_step_signals(shifted, scorer, ctx)
    assert out.ref_logprobs is None and torch.equal(out.prm_logprobs, out.logprobs)
    assert not torch.equal(out.logprobs, shifted.logprobs) and (out.step_rewards == 0).all()
    torch.testing.assert_close(out.logprobs, batch.logprobs, atol=1e-4, rtol=0)  # the sampler's, up to float bits
    # without a policy in the context the batch's log-probs are the denominator as given
    bare = SimpleNamespace(**{**vars(ctx), "policy": None})
    out = produce_step_signals(shifted, scorer, bare)
    assert torch.equal(out.logprobs, shifted.logprobs)
    n_tok = torch.stack([((batch.step_ids == k) & batch.response_mask).sum(1) for k in range(2)], 1)  # [B,2]
    # q = prm - (logprobs - .5) = (prm - logprobs) + .5 ~ .5 per token -> rho_k ~ beta * .5 * tokens(k)
    torch.testing.assert_close(out.step_rewards, 0.05 * 0.5 * n_tok.float(), atol=1e-5, rtol=0)
    _, ref_logp = scorer.logprobs(shifted)
    assert torch.equal(ref_logp, shifted.logprobs)
    with pytest.raises(ValueError, match="logprobs"):
        scorer.score_steps(batch.replace(logprobs=None), bare)
    frozen = ImplicitPRMScorer(policy, mode="oprl", reference="frozen")  # iStar with ref_path set
    assert frozen.ref is not None and produce_step_signals(shifted, frozen, ctx).ref_logprobs is not None
    with pytest.raises(ValueError, match="reference='frozen'"):
        ImplicitPRMScorer(policy, mode="oprl", ref_model=policy)
    with pytest.raises(ValueError, match="reference"):
        ImplicitPRMScorer(policy, mode="prime", reference="old")
