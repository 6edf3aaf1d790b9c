"""Truncate-and-answer (creditlab.signals.budget): cut plans, sampling and scoring with the real tiny policy and the
arith_chain verifier, sample accounting, the anytime evaluation, HBPO's budget-prefixed rollout and the marker-word
step split (creditlab.signals.steps mode "markers")."""

import pytest
import torch

from creditlab.batch import RolloutBatch
from creditlab.policy import load_policy
from creditlab.rollout.hf import SamplingConfig, continue_from, generate
from creditlab.signals.budget import (
    BudgetPrefixRollout,
    answer_cue,
    anytime_accuracy,
    budget_cuts,
    even_budgets,
    parse_budgets,
    step_cuts,
    truncate_and_answer,
)
from creditlab.signals.produce import SignalContext
from creditlab.signals.steps import split_steps
from creditlab.tasks import get_task
from creditlab.train.config import RolloutConfig


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", seed=0)


@pytest.fixture(scope="module")
def task():
    return get_task("arith_chain", n_steps=2)


def batch_of(policy, problems, responses, rewards, eos=None):
    """A batch of hand-written responses (ids from the tokenizer), EOS appended where eos[b]."""
    tok = policy.tokenizer
    prompts = [policy.format_prompt(p.prompt) for p in problems]
    p_ids, p_mask = policy.encode_prompts(prompts)
    rows = [tok(r, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if (eos or [False] * 9)[i] else [])
            for i, r in enumerate(responses)]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = True
    return RolloutBatch(response_ids=ids, response_mask=mask, group_ids=torch.arange(len(rows)),
                        rewards=torch.tensor(rewards), prompt_ids=p_ids, prompt_mask=p_mask,
                        texts=list(responses)).validate()


def test_parse_and_default_budgets():
    assert parse_budgets("64,128, 256") == [64, 128, 256] and parse_budgets("") == []
    assert even_budgets(64) == [16, 32, 48, 64]
    for bad in ("64,32", "a,b", "0,4", "8,8"):
        with pytest.raises(ValueError, match="--budgets"):
            parse_budgets(bad)


def test_answer_cue():
    assert answer_cue(get_task("arith_chain")) == "\nAnswer:"
    assert answer_cue(get_task("chain_sum")) == "\nThe answer is"
    assert answer_cue(get_task("arith_chain"), "\nFinal:") == "\nFinal:"


def test_budget_cuts_keep_own_outcome_only_for_stopped_short_rows(tiny, task):
    probs = task.problems("train", 2, 0)
    b = batch_of(tiny, probs, ["1 + 2 = 3", "4 * 2 = 8 and on"], [1.0, 0.0], eos=[True, False])
    cuts = budget_cuts(b, [4, 10, 40], tiny.stop_ids)
    # row 0: 9 chars + EOS = 10 tokens, stopped -> own outcome at budgets >= 10; row 1 never stopped (16 tokens)
    assert cuts.keep.tolist() == [[4, 10, 10], [4, 10, 16]]
    assert cuts.own.tolist() == [[False, True, True], [False, False, False]]


def test_truncate_and_answer_scores_and_charges(tiny, task):
    probs = task.problems("train", 2, 0)
    gold = task.demonstration(probs[0])
    b = batch_of(tiny, [probs[0], probs[0], probs[1]], [gold, gold, "9 - 1"], [1.0, 1.0, 0.0],
                 eos=[True, True, False])
    b = b.replace(group_ids=torch.tensor([0, 0, 1]))
    ctx = SignalContext(policy=tiny, problems=probs, task=task, seed=5)
    cuts = budget_cuts(b, [3, 200], tiny.stop_ids)
    out = truncate_and_answer(b, cuts, ctx, answers=3, answer_tokens=6, cue="\nAnswer:", temperature=0.0)
    # rows 0 and 1 are identical: one prefix at budget 3; row 2 (not stopped): budget 3 and its whole text
    assert len(out.prefixes) == 3 and ctx.counters["samples/extra"] == 9
    assert out.cut_scores[:, 1].tolist()[:2] == [1.0, 1.0]  # stopped gold answers keep their own outcome
    # recompute one cell by hand: greedy answer after row 2's 3 tokens + cue, scored by the verifier
    prefix = b.prompt_ids[2][b.prompt_mask[2]].tolist() + b.response_ids[2, :3].tolist() \
        + tiny.tokenizer("\nAnswer:", add_special_tokens=False)["input_ids"]
    ans = continue_from(tiny, [prefix], 1, SamplingConfig(temperature=0.0, max_new_tokens=6), seed=0)[0][0]
    text = tiny.tokenizer.decode(b.response_ids[2, :3].tolist()) + "\nAnswer:" + tiny.tokenizer.decode(
        ans, skip_special_tokens=True)
    assert float(out.cut_scores[2, 0]) == task.score(probs[1], text).reward
    assert ctx.counters["tokens/extra"] == sum(len(a) for outs in out.answers for a in outs)


def test_step_cuts_follow_marker_words(tiny):
    text = "We add. So x is 4. Then Wait no, it is 5"
    assert [text[s:e] for s, e in split_steps(text, "markers")] == ["We add.", "So x is 4.", "Then Wait no, it is 5"]
    b = batch_of(tiny, get_task("arith_chain").problems("train", 1, 0), [text], [0.0])
    cuts = step_cuts(b, SignalContext(policy=tiny), mode="markers")
    assert cuts.cut_lens.tolist() == [[0, 8, 19]]  # char-level tokenizer: step starts at characters 8 and 19


def test_anytime_accuracy_reports_every_budget(tiny, task):
    probs = task.problems("test", 3, 0)
    m = anytime_accuracy(tiny, task, probs, [4, 8, 64], max_new_tokens=16, answer_tokens=4, cue="\nAnswer:")
    assert set(m) == {"eval/acc@4", "eval/acc@8", "eval/acc@64", "eval/anytime_auc", "eval/length"}
    assert m["eval/anytime_auc"] == pytest.approx((m["eval/acc@4"] + m["eval/acc@8"] + m["eval/acc@64"]) / 3)
    assert 0 < m["eval/length"] <= 16


def test_budget_prefix_rollout(tiny, task):
    probs = task.problems("train", 2, 0)
    cfg = RolloutConfig(group_size=4, max_new_tokens=8)
    batch, scores = BudgetPrefixRollout([8, 16]).collect(tiny, task, probs, cfg, seed=0)
    assert batch.group_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch.think_budget.tolist() == [8, 8, 16, 16, 8, 8, 16, 16]
    text = tiny.tokenizer.decode(batch.prompt_ids[2][batch.prompt_mask[2]].tolist())
    assert text.endswith("I will answer the question with 16 tokens.\n")
    assert batch.correct.tolist() == [s.correct for s in scores] and len(scores) == 8
    with pytest.raises(ValueError, match="group-size"):
        BudgetPrefixRollout([8, 16, 32]).collect(tiny, task, probs, cfg, seed=0)


def test_generate_then_cut_every_cell_is_finite(tiny, task):
    probs = task.problems("train", 2, 1)
    b = generate(tiny, [tiny.format_prompt(p.prompt) for p in probs], 3, SamplingConfig(max_new_tokens=12), seed=2)
    ctx = SignalContext(policy=tiny, problems=probs, task=task, seed=1)
    out = truncate_and_answer(b, budget_cuts(b, [4, 8, 12], tiny.stop_ids), ctx, answers=2, answer_tokens=4,
                              cue="\nAnswer:")
    assert out.cut_scores.shape == (6, 3) and torch.isfinite(out.cut_scores).all()
    assert ((out.cut_scores >= 0) & (out.cut_scores <= 1)).all()
