"""MA-RLHF, POAD and ArCHer (creditlab.credit.macro): hand cases, reductions, loop references, bad input."""

import itertools

import pytest
import torch

from creditlab import get_estimator
from creditlab.batch import RolloutBatch
from creditlab.credit.loops.macro import LOOPS, loop_ma_rlhf
from creditlab.credit.macro import RANDOMIZED_LENGTHS, macro_starts, reverse_scan
from creditlab.sample import random_batch


def one_row(values, rewards, **fields):
    T = len(values)
    ids = torch.arange(T)[None, :] % 7
    mask = torch.ones(1, T, dtype=torch.bool)
    return RolloutBatch(response_ids=ids, response_mask=mask, group_ids=torch.zeros(1, dtype=torch.long),
                        rewards=torch.tensor([sum(rewards)]), values=torch.tensor([values]),
                        token_rewards=torch.tensor([rewards]), ref_logprobs=torch.zeros(1, T), **fields)


def with_gaps(batch, seed):
    """Mask ~20% of interior tokens (multi-turn observation tokens) and put junk under the new gaps."""
    g = torch.Generator().manual_seed(seed)
    gap = (torch.rand(batch.response_mask.shape, generator=g) < 0.2) & batch.response_mask
    mask = batch.response_mask & ~gap
    junk = {name: torch.where(mask, getattr(batch, name), torch.randn(mask.shape, generator=g) * 5)
            for name in ("values", "q_values", "token_rewards", "ref_logprobs")}
    ids = {name: torch.where(mask, getattr(batch, name), -1) for name in ("step_ids", "turn_ids")}
    return batch.replace(response_mask=mask, **junk, **ids).validate()


# ------------------------------------------------------------------------------------------------ MA-RLHF
def test_ma_rlhf_hand_case_from_methods_md():
    # methods.md §8.6: 5 tokens, n = 2 -> macros {0,1},{2,3},{4}; equal weights give macro V = [.2,.4,.6], R = [0,0,1];
    # delta = [.2,.2,.4]; A = [.2 + .95*.58, .2 + .95*.4, .4] = [.751, .58, .4] on the macros' tokens.
    b = one_row([.2, .2, .4, .4, .6], [0, 0, 0, 0, 1.0])
    c = get_estimator("ma_rlhf")(b, n=2, gamma=1.0, lam=0.95)
    torch.testing.assert_close(c.advantages[0], torch.tensor([.751, .751, .58, .58, .4]))
    torch.testing.assert_close(c.returns[0], torch.tensor([.951, .951, .98, .98, 1.0]))  # A + macro V


def test_reference_quirk_empty_macro_changes_the_hand_case():
    # The reference appends the last index unconditionally: with L = 5, n = 2 the count ends at index 4, so the split
    # points are [0, 2, 4, 4] -> an empty third macro with V = R = 0: V = [.2,.4,0,.6], R = [0,0,0,1];
    # delta = [.2, -.4, .6, .4]; A4 = .4, A3 = .6 + .95*.4 = .98, A2 = -.4 + .95*.98 = .531, A1 = .2 + .95*.531.
    b = one_row([.2, .2, .4, .4, .6], [0, 0, 0, 0, 1.0])
    quirk = loop_ma_rlhf(b, n=2, compat=True)[0]
    a2 = -.4 + .95 * .98
    torch.testing.assert_close(quirk, torch.tensor([.2 + .95 * a2] * 2 + [a2] * 2 + [.4], dtype=torch.float64))


@pytest.mark.parametrize("whiten", [False, True])
def test_ma_rlhf_with_n_1_is_token_level_gae(whiten):
    for seed in range(10):
        b = with_gaps(random_batch(seed=seed, T=12), seed)
        got = get_estimator("ma_rlhf")(b, n=1, gamma=0.9, lam=0.7, whiten=whiten)
        want = get_estimator("gae")(b, gamma=0.9, lam=0.7, whiten=whiten)
        torch.testing.assert_close(got.advantages, want.advantages, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.returns, want.returns, atol=1e-5, rtol=1e-5)


def test_macro_weightings_on_one_three_token_macro():
    # One macro {0,1,2} plus the last token {3}: V = [1, 2, 4, 0], r = 0 except 1 on the last token, gamma = lam = 1.
    # equal: V_1 = 7/3; unit: V_1 = 4 (last token);
    # position: (1 + 2/2 + 4/3) / (1 + 1/2 + 1/3) = (10/3) / (11/6) = 20/11.
    # A_1 = R_1 + V_2 - V_1 + A_2-part = 0 + 0 - V_1 + (1 - 0) -> A_1 = 1 - V_1.
    b = one_row([1.0, 2.0, 4.0, 0.0], [0, 0, 0, 1.0])
    for weighting, v1 in (("equal", 7 / 3), ("unit", 4.0), ("position", 20 / 11)):
        adv = get_estimator("ma_rlhf")(b, n=3, weighting=weighting, gamma=1.0, lam=1.0).advantages[0]
        torch.testing.assert_close(adv, torch.tensor([1 - v1] * 3 + [1.0]), msg=weighting)


def test_macro_rewards_are_summed_unless_weighted_is_asked():
    # A KL reward of -0.1 on each of 3 tokens of one macro: summed R = -0.3; the reference's equal weighting
    # averages it to -0.1 (the 1/|tau| shrinkage documented as a deviation). V = 0, gamma = lam = 1, n = 3.
    b = one_row([0.0] * 4, [-0.1, -0.1, -0.1, 1.0])
    summed = get_estimator("ma_rlhf")(b, n=3, gamma=1.0, lam=1.0).advantages[0]
    averaged = get_estimator("ma_rlhf")(b, n=3, gamma=1.0, lam=1.0, reward_agg="weighted").advantages[0]
    torch.testing.assert_close(summed, torch.tensor([0.7, 0.7, 0.7, 1.0]))
    torch.testing.assert_close(averaged, torch.tensor([0.9, 0.9, 0.9, 1.0]))


def test_ppl_rule_starts_where_reference_perplexity_rises_next():
    # ref_logp = [-1, -2, -0.5, -3, -1, -1]: ppl rises from i to i+1 at i = 0 (1 -> 2), 2 (0.5 -> 3); token 0 starts
    # anyway and the last token (5) is its own macro -> starts at {0, 2, 5}.
    ref = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0, -1.0]])
    starts = macro_starts("ppl", torch.ones(1, 6, dtype=torch.bool), ref_logp_c=ref)
    assert starts[0].nonzero().flatten().tolist() == [0, 2, 5]


def test_fixed_rule_keeps_the_last_token_alone_and_drops_empty_macros():
    mask = torch.arange(8)[None, :] < torch.tensor([[1], [4], [5], [8]])
    starts = macro_starts("fixed", mask, n=2)
    assert [r.nonzero().flatten().tolist() for r in starts] == [[0], [0, 2, 3], [0, 2, 4], [0, 2, 4, 6, 7]]


def test_randomized_rule_uses_the_reference_lengths_then_one_remainder_macro():
    T = 60
    ids = torch.randint(0, 50, (6, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(6, T, dtype=torch.bool)
    starts = macro_starts("randomized", mask, ids_c=ids, repeat_times=2, seed=3)
    seen = set()
    for row in starts:
        s = row.nonzero().flatten().tolist()
        sizes = [b - a for a, b in itertools.pairwise(s)]
        assert s[-1] == T - 1  # the last token alone
        assert sorted(sizes[:-1]) == sorted(x for x in RANDOMIZED_LENGTHS for _ in range(2))  # 42 tokens, then the rest
        assert sizes[-1] == T - 1 - 42
        seen.add(tuple(sizes))
    assert len(seen) > 1  # rows with different tokens get different shuffles
    again = macro_starts("randomized", mask, ids_c=ids, repeat_times=2, seed=3)
    assert torch.equal(starts, again)
    other = macro_starts("randomized", mask, ids_c=ids, repeat_times=2, seed=4)
    assert not torch.equal(starts, other)


# ------------------------------------------------------------------------------------------------ POAD
def test_poad_hand_case_two_actions():
    # Actions {0,1} and {2,3}; V = [.1,.3,.5,.7]; outcome 1 on token 3; gamma = .9, lam = .8 (no whitening).
    # t3 (last of the last action): delta = 1 - .7 = .3, g = .3
    # t2 (inside):                  delta = .7 - .5 = .2, g = .2 + .8*.3 = .44
    # t1 (last of action 0):        delta = 0 + .9*.5 - .3 = .15, g = .15 + .9*.8*.44 = .4668
    # t0 (inside):                  delta = .3 - .1 = .2, g = .2 + .8*.4668 = .57344
    b = one_row([.1, .3, .5, .7], [0, 0, 0, 1.0], step_ids=torch.tensor([[0, 0, 1, 1]]))
    c = get_estimator("poad")(b, gamma=0.9, lam=0.8, whiten=False)
    torch.testing.assert_close(c.advantages[0], torch.tensor([.57344, .4668, .44, .3]))
    torch.testing.assert_close(c.returns[0], torch.tensor([.67344, .7668, .94, 1.0]))


@pytest.mark.parametrize("whiten", [False, True])
def test_poad_reduces_to_gae(whiten):
    for seed in range(10):
        b = with_gaps(random_batch(seed=seed, T=12), seed)
        one_action = b.replace(turn_ids=torch.where(b.response_mask, 0, -1))  # one action per response, gamma = 1
        got = get_estimator("poad_turns")(one_action, gamma=1.0, lam=0.7, whiten=whiten)
        want = get_estimator("gae")(b, gamma=1.0, lam=0.7, whiten=whiten)
        torch.testing.assert_close(got.advantages, want.advantages, atol=1e-5, rtol=1e-5)
        per_token = b.replace(step_ids=torch.where(b.response_mask, torch.arange(b.T).expand(b.B, -1), -1),
                              step_rewards=None, step_labels=None, mc_values=None)
        got = get_estimator("poad")(per_token, gamma=0.8, lam=0.6, whiten=whiten)  # one token per action
        want = get_estimator("gae")(b, gamma=0.8, lam=0.6, whiten=whiten)
        torch.testing.assert_close(got.advantages, want.advantages, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.returns, want.returns, atol=1e-5, rtol=1e-5)


def test_reverse_scan_matches_a_loop_across_chunks():
    g = torch.Generator().manual_seed(0)
    x, d = torch.randn(3, 150, generator=g), torch.rand(3, 150, generator=g)
    d[:, ::7] = 0.0  # zero discounts cut the scan
    want = torch.zeros(3, 150, dtype=torch.float64)
    for b in range(3):
        nxt = 0.0
        for t in reversed(range(150)):
            nxt = float(x[b, t]) + float(d[b, t]) * nxt
            want[b, t] = nxt
    torch.testing.assert_close(reverse_scan(x, d, chunk=16), want)


# ------------------------------------------------------------------------------------------------ ArCHer
def test_archer_hand_case_two_turns_with_an_observation_between():
    # turn 0 = tokens 0-1, an observation token (masked) at 2, turn 1 = tokens 3-4.
    # A(turn 0) = Q[0] - V[0] = .9 - .4 = .5; A(turn 1) = Q[3] - V[3] = .2 - .6 = -.4.
    mask = torch.tensor([[True, True, False, True, True]])
    b = RolloutBatch(response_ids=torch.ones(1, 5, dtype=torch.long), response_mask=mask,
                     group_ids=torch.zeros(1, dtype=torch.long), rewards=torch.ones(1),
                     values=torch.tensor([[.4, .0, 9.0, .6, .0]]), q_values=torch.tensor([[.9, .9, 9.0, .2, .2]]),
                     turn_ids=torch.tensor([[0, 0, -1, 1, 1]]))
    c = get_estimator("archer")(b)
    torch.testing.assert_close(c.advantages[0], torch.tensor([.5, .5, 0.0, -.4, -.4]))
    assert c.returns is None


# ------------------------------------------------------------------------------------------------ loops
CASES = [("ma_rlhf", {}), ("ma_rlhf", {"n": 2, "weighting": "unit"}),
         ("ma_rlhf", {"rule": "ppl", "weighting": "position", "gamma": 0.9}),
         ("ma_rlhf", {"rule": "randomized", "repeat_times": 1, "seed": 5}),
         ("ma_rlhf", {"reward_agg": "weighted", "gamma": 0.9, "lam": 0.5, "whiten": True}),
         ("poad", {}), ("poad", {"gamma": 1.0, "lam": 0.0, "whiten": False}), ("poad", {"gamma": 0.0}),
         ("poad_turns", {"lam": 1.0}), ("archer", {}), ("archer", {"whiten": True})]


@pytest.mark.parametrize("name,kw", CASES)
def test_vectorized_matches_loop_on_ragged_batches_with_gaps(name, kw):
    for seed in range(12):
        b = random_batch(seed=seed, T=14, n_groups=3, max_group=4, empty_row_prob=0.2)
        b = with_gaps(b, seed) if seed % 2 else b
        got = get_estimator(name)(b, **kw).advantages.double()
        torch.testing.assert_close(got, LOOPS[name](b, **kw), atol=1e-5, rtol=1e-5, msg=f"{name} {kw} seed {seed}")


def test_returns_match_loops():
    for seed in range(6):
        b = with_gaps(random_batch(seed=seed, T=14), seed)
        _, want = LOOPS["ma_rlhf"](b, n=3, return_returns=True)
        torch.testing.assert_close(get_estimator("ma_rlhf")(b, n=3).returns.double(), want, atol=1e-5, rtol=1e-5)
        from creditlab.credit.loops.macro import loop_poad

        _, want = loop_poad(b, b.step_ids, return_returns=True)
        torch.testing.assert_close(get_estimator("poad")(b).returns.double(), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name,kw,needle", [
    ("ma_rlhf", {"n": 0}, r"\bn\b"), ("ma_rlhf", {"rule": "parsing"}, "parsing"),
    ("ma_rlhf", {"weighting": "mean"}, "weighting"), ("ma_rlhf", {"lam": 1.5}, "lam"),
    ("ma_rlhf", {"reward_agg": "mean"}, "reward_agg"), ("poad", {"gamma": -0.1}, "gamma"),
])
def test_bad_hyperparameters_name_the_parameter(name, kw, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        get_estimator(name)(random_batch(seed=0), **kw)


@pytest.mark.parametrize("name,field", [("ma_rlhf", "values"), ("poad", "values"), ("archer", "q_values")])
def test_missing_critic_fields_are_named(name, field):
    with pytest.raises(ValueError, match=field):
        get_estimator(name)(random_batch(seed=0).replace(**{field: None}))
