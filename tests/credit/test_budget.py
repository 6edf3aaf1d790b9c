"""Budget credit: brpo (methods.md §7.1/§12.6), hbpo (§12.1), vsrm (§12.2).

BRPO numbers are methods.md's hand case and a second case whose expected values were produced by running the
reference `compute_cot_advantage` / `compute_summary_advantage` (sail-sg/AnytimeReasoner brpo.py @7e3f5bb) on the
same scores, and re-derived by hand below. HBPO and VSRM numbers are derived by hand from the formulas in the
estimators' docstrings. Loop references are checked on random ragged batches.
"""

import math

import pytest
import torch

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.budget import hbpo_reward, summary_advantages
from creditlab.credit.loops import LOOPS
from creditlab.sample import random_batch


def make(lengths, rewards, group_ids=None, T=None, **fields):
    B = len(lengths)
    T = T or max(lengths)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return RolloutBatch(response_ids=torch.where(mask, 5, 0).long(), response_mask=mask,
                        group_ids=torch.tensor(group_ids if group_ids is not None else [0] * B),
                        rewards=torch.tensor(rewards, dtype=torch.float32), **fields).validate()


# ------------------------------------------------------------------------------------------------ BRPO
def test_brpo_methods_md_hand_case():
    # S = 2, uniform p = [.5, .5]; rbar at budget 1 = [0, 1], at budget 2 = [1, 1].
    # Segment 0: R = [.5, 1], V2 = .75 -> A = [-.25, .25]. Segment 1: R = [.5, .5], V2 = .5, V1 = [0, .5],
    # baseline = (1 V1 + 1 V2) / 2 = [.25, .5] -> A = [.25, 0]. (The reference code returns the same.)
    b = make([4, 4], [0.0, 1.0], cut_lens=torch.tensor([[2, 4], [2, 4]]),
             cut_scores=torch.tensor([[0.0, 1.0], [1.0, 1.0]]))
    adv = get_estimator("brpo")(b).advantages
    torch.testing.assert_close(adv, torch.tensor([[-0.25, -0.25, 0.25, 0.25], [0.25, 0.25, 0.0, 0.0]]))


def test_brpo_three_budgets_match_the_reference_run():
    # rbar (mean of 2 answers per budget) = row0 [.5, 1, 0], row1 [1, .5, 1], row2 [0, 0, .5]; uniform p = 1/3.
    # s=0: R = [.5, .8333, .1667], V2 = .5 -> A = [0, .3333, -.3333]
    # s=1: R = [.3333, .5, .1667], V2 = .3333, V1 = rbar_0 * 2/3 = [.3333, .6667, 0],
    #      baseline = (V1 + 2 V2) / 3 = [.3333, .4444, .2222] -> A = [0, .0556, -.0556]
    # s=2: R = [0, .3333, .1667], V2 = .1667, V1 = (rbar_0 + 2 rbar_1) / 3 * 1/3 = [.2778, .2222, 0],
    #      baseline = (2 V1 + V2) / 3 = [.2407, .2037, .0556] -> A = [-.2407, .1296, .1111]
    # (reference compute_cot_advantage printed [[0, 0, -.2407], [.3333, .0556, .1296], [-.3333, -.0556, .1111]])
    scores = torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.5, 1.0], [0.0, 0.0, 0.5]])
    b = make([3, 3, 3], [0.0, 1.0, 0.0], cut_lens=torch.tensor([[1, 2, 3]] * 3), cut_scores=scores)
    adv = get_estimator("brpo")(b).advantages
    expected = torch.tensor([[0.0, 0.0, -0.2407], [0.3333, 0.0556, 0.1296], [-0.3333, -0.0556, 0.1111]])
    torch.testing.assert_close(adv, expected, atol=1e-4, rtol=0)


def test_brpo_short_response_tail_joins_the_first_budget_it_does_not_reach():
    # budgets [2, 4, 8]; a response of 5 tokens: tokens 0-1 -> segment 0, 2-3 -> 1, token 4 -> 2 (the reference's
    # collapsed split); a response of 10 tokens puts tokens 8-9 after the last budget into the last segment.
    b = make([5, 10], [0.0, 1.0], cut_lens=torch.tensor([[2, 4, 8], [2, 4, 8]]),
             cut_scores=torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]))
    adv = get_estimator("brpo")(b, baseline="none").advantages
    # baseline none: A_s = R_s = sum_{j>=s} rbar_j / 3 -> row0 [1/3, 1/3, 1/3], row1 [1, 2/3, 1/3]
    torch.testing.assert_close(adv[0, :5], torch.full((5,), 1 / 3))
    torch.testing.assert_close(adv[1], torch.tensor([1, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3]))


def test_brpo_single_budget_v2only_is_dr_grpo_on_the_final_score():
    for seed in range(10):
        b = random_batch(n_groups=3, max_group=5, T=8, seed=seed, min_group=2)
        b = b.replace(cut_lens=torch.full((b.B, 1), 8), cut_scores=b.rewards[:, None].clone())
        torch.testing.assert_close(get_estimator("brpo")(b, baseline="v2only").advantages,
                                   get_estimator("dr_grpo")(b).advantages)


def test_brpo_priors():
    b = make([4, 4], [0.0, 1.0], cut_lens=torch.tensor([[1, 3], [1, 3]]),
             cut_scores=torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    # linear p = [1/4, 3/4]: segment 0 returns R = [.25, .75], V2 = .5 -> A = [-.25, .25]
    assert get_estimator("brpo")(b, prior="linear").advantages[:, 0].tolist() == pytest.approx([-0.25, 0.25])
    # base p = [0, 1]: R_0 = [0, 1] -> A = [-.5, .5]
    assert get_estimator("brpo")(b, prior="base").advantages[:, 0].tolist() == pytest.approx([-0.5, 0.5])


def test_summary_advantages_match_the_reference_run():
    # answers of 3 responses x 3 budgets x 2 answers, grouped by prefix: score - mean of the prefix's 2 scores
    # (reference compute_summary_advantage printed +-.5 / 0 exactly these)
    scores = torch.tensor([0., 1., 1., 1., 0., 0., 1., 1., 0., 1., 1., 1., 0., 0., 0., 0., 1., 0.])
    prefix = torch.arange(9).repeat_interleave(2)
    adv = summary_advantages(scores, prefix, prefix, n_answers=2)
    expected = [-.5, .5, 0, 0, 0, 0, 0, 0, -.5, .5, 0, 0, 0, 0, 0, 0, .5, -.5]
    assert adv.tolist() == pytest.approx(expected)
    # a prefix holding a single answer gets baseline 0 (the reference's grpo_id2mean for one score)
    assert summary_advantages(torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0]), 2).tolist() == [1.0]


def test_brpo_rejects_unordered_cuts():
    b = make([4], [1.0], cut_lens=torch.tensor([[3, 2]]), cut_scores=torch.tensor([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="cut_lens"):
        get_estimator("brpo")(b)


# ------------------------------------------------------------------------------------------------ HBPO
def test_hbpo_reward_hand_values():
    # l_max = 100, beta = 4 -> f(x) = 4 cos(pi x / 200); alpha = 1/100. f(50) = 2.8284, f(100) = 0.
    correct = torch.tensor([True, True, True, False, True])
    length = torch.tensor([50, 100, 50, 30, 150])
    budget = torch.tensor([50, 50, 100, 100, 50])
    r = hbpo_reward(correct, length, budget, torch.tensor([0.0, 0, 0, 0.3, 0]), beta=4.0, l_max=100, alpha=0.01)
    # [min(f(50), f(50)), min(f(100) - .5, f(50)), min(f(50) - .5, f(100)), wrong -> task reward, too long -> 0]
    assert r.tolist() == pytest.approx([2.828427, -0.5, 0.0, 0.3, 0.0], abs=1e-5)
    # paper's piecewise form: row 2 (L = 50 <= b = 100) takes f2 = f(100) = 0 either way; a within-budget row
    # where f1 < f2: l_max = 100, b = 10, L = 1: f1 = 4 cos(pi/200) - .09 = 3.9095, f2 = 4 cos(pi/20) = 3.9507
    args = (torch.tensor([True]), torch.tensor([1]), torch.tensor([10]), torch.tensor([0.0]))
    assert float(hbpo_reward(*args, beta=4.0, l_max=100, alpha=0.01)) == pytest.approx(3.909507, abs=1e-5)
    assert float(hbpo_reward(*args, beta=4.0, l_max=100, alpha=0.01, piecewise=True)) == pytest.approx(3.950753,
                                                                                                        abs=1e-5)


def test_hbpo_advantage_hand_case():
    # R = [2.8284, -.5, 0, 0] (as above), one group. mean .5821, unbiased std 1.5160
    # inter z = [1.4818, -.7138, -.3840, -.3840];
    # intra: budget 50 subgroup mean (2.8284 - .5)/2 = 1.1642 minus f(50) = -1.6642; budget 100: 0 - f(100) = 0
    # A = [-.1824, -2.3780, -.3840, -.3840]
    b = make([50, 100, 50, 30], [1.0, 1.0, 1.0, 0.0], T=100, think_budget=torch.tensor([50, 50, 100, 100]),
             correct=torch.tensor([True, True, True, False]))
    adv = get_estimator("hbpo")(b, l_max=100).advantages
    assert [float(adv[i, 0]) for i in range(4)] == pytest.approx([-0.1824, -2.3780, -0.3840, -0.3840], abs=2e-4)
    assert (adv[3, 30:] == 0).all()


def test_hbpo_singleton_and_budget_checks():
    b = make([3], [1.0], think_budget=torch.tensor([8]), correct=torch.tensor([True]))
    assert (get_estimator("hbpo")(b, l_max=16).advantages == 0).all()
    raw = get_estimator("hbpo")(b, l_max=16, singleton="raw").advantages
    assert float(raw[0, 0]) == pytest.approx(min(4 * math.cos(math.pi * 3 / 32) - 5 / 16, 4 * math.cos(math.pi / 4)),
                                             abs=1e-6)  # R itself, no intra term
    with pytest.raises(ValueError, match="l_max"):
        get_estimator("hbpo")(b, l_max=4)


# ------------------------------------------------------------------------------------------------ VSRM
def test_vsrm_hand_case():
    # cuts [0, 2, 4], accuracy [.25, .75, .5]: d_1 = .5 on token 1, d_2 = -.25 on token 3, outcome 1 on token 5.
    # token rewards [0, .5, 0, -.25, 0, 1] -> returns (gamma 1) [1.25, 1.25, .75, .75, 1, 1]
    b = make([6], [1.0], cut_lens=torch.tensor([[0, 2, 4]]), cut_scores=torch.tensor([[0.25, 0.75, 0.5]]))
    credit = get_estimator("vsrm")(b, whiten=False)
    torch.testing.assert_close(credit.advantages[0], torch.tensor([1.25, 1.25, 0.75, 0.75, 1.0, 1.0]))
    w = get_estimator("vsrm")(b).advantages[0]  # whitened: mean 0 over the tokens
    assert float(w.mean()) == pytest.approx(0.0, abs=1e-6)


def test_vsrm_lookahead_fills_zero_steps():
    # accuracy [.5, .5, 1]: d = [., 0, .5]; lookahead 1, decay .5 -> d_1 = .25 (from step 2), d_2 = .5
    # token rewards [0, .25, 0, .5, 0, 0] + outcome 0 -> returns [.75, .75, .5, .5, 0, 0]
    b = make([6], [0.0], cut_lens=torch.tensor([[0, 2, 4]]), cut_scores=torch.tensor([[0.5, 0.5, 1.0]]))
    adv = get_estimator("vsrm")(b, whiten=False, lookahead=1, lookahead_decay=0.5).advantages[0]
    torch.testing.assert_close(adv, torch.tensor([0.75, 0.75, 0.5, 0.5, 0.0, 0.0]))


# ------------------------------------------------------------------------------------------------ loops
def ragged(seed):
    return random_batch(n_groups=1 + seed % 5, max_group=6, T=1 + seed % 13, seed=seed, binary_rewards=seed % 3 != 0,
                        empty_row_prob=0.2)


CASES = [
    ("brpo", {}), ("brpo", {"prior": "linear", "baseline": "v1only"}),
    ("brpo", {"prior": "base", "baseline": "v2only", "singleton": "raw"}), ("brpo", {"baseline": "none"}),
    ("brpo", {"history_base": 3.0}),
    ("hbpo", {"l_max": 64}), ("hbpo", {"l_max": 32, "singleton": "raw", "alpha": 0.1, "beta": 1.0}),
    ("hbpo", {"l_max": 16, "piecewise": True}),
    ("vsrm", {}), ("vsrm", {"lookahead": 2, "gamma": 0.9}), ("vsrm", {"whiten": False, "step_coef": 0.5,
                                                                      "lookahead": 1}),
]


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_loop_reference(name, kw):
    for seed in range(50):
        b = ragged(seed)
        torch.testing.assert_close(get_estimator(name)(b, **kw).advantages.double(), LOOPS[name](b, **kw),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,kw,needle", [
    ("brpo", {"prior": "cubic"}, "prior"), ("brpo", {"baseline": "v3"}, "baseline"),
    ("brpo", {"history_base": 0.0}, "history_base"), ("hbpo", {"alpha": -1.0}, "alpha"),
    ("vsrm", {"lookahead": -1}, "lookahead"),
])
def test_bad_hyperparameters_name_the_parameter(name, kw, needle):
    with pytest.raises(ValueError, match=needle):
        get_estimator(name)(ragged(3), **kw)


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_loop_reference_with_holes_in_the_mask(name, kw):
    for seed in range(30):
        b = ragged(seed)
        keep = torch.rand(b.response_mask.shape, generator=torch.Generator().manual_seed(seed)) > 0.25
        mask = b.response_mask & keep
        b = b.replace(response_mask=mask, **{f: torch.where(mask, getattr(b, f), -1) for f in
                                             ("step_ids", "turn_ids", "tree_node") if getattr(b, f) is not None})
        b = b.validate()
        torch.testing.assert_close(get_estimator(name)(b, **kw).advantages.double(), LOOPS[name](b, **kw),
                                   atol=1e-5, rtol=1e-5)
