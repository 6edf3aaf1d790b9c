"""Agent signal producers: IGPO's answer probabilities (signals/info_gain.py) and tool-call strata (strata.py)."""

import pytest
import torch

from creditlab.policy import load_policy
from creditlab.rollout.hf import SamplingConfig, sequence_logprobs
from creditlab.rollout.multiturn import EpisodeScore, MultiTurn
from creditlab.signals.info_gain import answer_probs
from creditlab.signals.strata import strata_by_tool_calls
from creditlab.tasks import get_task


@pytest.fixture(scope="module")
def rollout():
    torch.set_num_threads(1)
    policy = load_policy("tiny", seed=0)
    task = get_task("search")
    probs = task.problems("train", 2, seed=0)
    batch, scores = MultiTurn(max_turns=3).run(policy, task, probs, 2, SamplingConfig(max_new_tokens=5), seed=3)
    return policy, task, probs, batch, scores


def test_answer_probs_are_teacher_forced_geometric_means(rollout):
    policy, task, probs, b, _ = rollout
    template = task.make_env().answer_template
    answers = [probs[g].answer for g in b.group_ids.tolist()]
    P, n_tokens = answer_probs(policy, b, answers, template=template, chunk=3)
    tok = policy.tokenizer
    assert n_tokens > 0 and P.shape == (b.B, int(b.turn_ids.max()) + 1)
    for row in range(b.B):
        k = int(b.turn_ids[row].max()) + 1
        assert (P[row, k:] == 0).all() and ((P[row, :k] > 0) & (P[row, :k] < 1)).all()
        for n in range(k):
            # the same number from the trainer's scorer: context = prompt + row before turn n, response = the
            # answer action, scored on the gold tokens only
            first = int((b.turn_ids[row] == n).nonzero()[0])
            ctx = b.prompt_ids[row][b.prompt_mask[row]].tolist() + b.response_ids[row, :first].tolist()
            prefix = tok("answer: ", add_special_tokens=False)["input_ids"]
            gold = tok(answers[row], add_special_tokens=False)["input_ids"]
            resp = torch.tensor([prefix + gold])
            mask = torch.tensor([[False] * len(prefix) + [True] * len(gold)])
            logp, _ = sequence_logprobs(policy.model, torch.tensor([ctx]), torch.ones(1, len(ctx), dtype=torch.bool),
                                        resp, mask)
            assert float(P[row, n]) == pytest.approx(float(logp.detach()[0][mask[0]].mean().exp()), rel=1e-4)


def test_answer_probs_need_turns_and_a_template(rollout):
    policy, _, _, b, _ = rollout
    with pytest.raises(ValueError, match="turn_ids"):
        answer_probs(policy, b.replace(turn_ids=None), ["x"] * b.B)
    with pytest.raises(ValueError, match="template"):
        answer_probs(policy, b, ["x"] * b.B, template="no placeholder")


def test_strata_count_tool_calls_from_episode_scores(rollout):
    *_, scores = rollout
    got = strata_by_tool_calls(scores, "search")
    assert got.tolist() == [s.calls("search") for s in scores]
    made = [EpisodeScore(reward=0, correct=False, turns=t, tool_calls=(("search", c),)) for t, c in [(3, 2), (5, 7)]]
    assert strata_by_tool_calls(made, "search", max_stratum=4).tolist() == [2, 4]
    assert strata_by_tool_calls(made, None).tolist() == [3, 5]
    from creditlab.tasks.base import Score

    with pytest.raises(ValueError, match="episode scores"):
        strata_by_tool_calls([Score(reward=0, correct=False)])
