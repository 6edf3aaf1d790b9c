"""Process-reward estimators: hand-computed cases (methods.md §8, §6.4), loop references over many awkward random
batches (gapped step ids, step_id -1 holes inside responses, zero-step rows, singleton and constant groups,
all-padding rows), reductions, and trajectory_score invariants."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.loops.process import LOOPS
from creditlab.credit.ops import masked_whiten
from creditlab.credit.process import (
    _masked_rloo_tokens,
    dense_step_ids,
    merge_thoughts,
    softmin_rewards,
    step_layout,
    step_returns,
    trajectory_score,
)
from creditlab.sample import random_batch


def make(step_lens, rewards, group_ids=None, step_rewards=None, step_labels=None, pad=0, **extra):
    """Rows whose tokens are cut into consecutive steps of the given lengths (0-length entries -> token -1)."""
    B = len(step_lens)
    T = max(sum(abs(n) for n in lens) for lens in step_lens) + pad or 1
    mask = torch.zeros(B, T, dtype=torch.bool)
    sid = torch.full((B, T), -1)
    for b, lens in enumerate(step_lens):
        t, k = 0, 0
        for n in lens:
            for _ in range(abs(n)):
                mask[b, t] = True
                sid[b, t] = k if n > 0 else -1  # a negative length: |n| tokens outside any step
                t += 1
            k += n > 0
    S = max([sum(n > 0 for n in lens) for lens in step_lens] + [1])
    sr = torch.zeros(B, S) if step_rewards is None else torch.tensor(step_rewards, dtype=torch.float32)
    sl = torch.full(sr.shape, -1) if step_labels is None else torch.tensor(step_labels)
    return RolloutBatch(
        response_ids=mask.long() * 3, response_mask=mask, rewards=torch.tensor(rewards, dtype=torch.float32),
        group_ids=torch.tensor(group_ids if group_ids is not None else list(range(B))), step_ids=sid,
        step_rewards=sr, step_labels=sl, **extra).validate()


def step_values(credit, batch, b):
    """The advantage on the first token of each step of row b."""
    out = []
    for k in range(int(batch.step_ids[b].max()) + 1):
        pos = (batch.step_ids[b] == k).nonzero()
        out.append(float(credit.advantages[b, pos[0, 0]]))
    return out


# ---------------------------------------------------------------- PURE / sum-form hand cases (methods.md 8.1)
RHO = [[0.5, -0.2, 0.8]]


def test_pure_strict_hand_case():
    b = make([[1, 2, 1]], [1.0], step_rewards=RHO)
    c = get_estimator("pure")(b, mode="strict", baseline="none", vr_coef=0.0)
    assert step_values(c, b, 0) == pytest.approx([-0.2, -0.2, 0.8])
    assert c.advantages[0].tolist() == pytest.approx([-0.2, -0.2, -0.2, 0.8])


def test_sum_form_hand_case():
    b = make([[1, 1, 1]], [1.0], step_rewards=RHO)
    c = get_estimator("sum_form")(b, baseline="none", vr_coef=0.0)
    assert step_values(c, b, 0) == pytest.approx([1.1, 0.6, 0.8])
    # gamma-decay: G = [.5 + .9(-.2 + .9*.8), -.2 + .9*.8, .8]
    c = get_estimator("sum_form")(b, baseline="none", vr_coef=0.0, gamma=0.9)
    assert step_values(c, b, 0) == pytest.approx([0.5 + 0.9 * (-0.2 + 0.72), -0.2 + 0.72, 0.8])


def test_pure_softmin_hand_case():
    present = torch.ones(1, 3, dtype=torch.bool)
    rho_star = softmin_rewards(torch.tensor(RHO), present, 0.1)
    assert rho_star[0].tolist() == pytest.approx([0.00046, -0.19981, 0.00004], abs=1e-5)
    b = make([[1, 1, 1]], [1.0], step_rewards=RHO)
    c = get_estimator("pure")(b, baseline="none", vr_coef=0.0)  # softmin is the default (what PURE trains)
    assert step_values(c, b, 0) == pytest.approx([-0.1993, -0.1998, 0.00004], abs=1e-4)


def test_pure_outcome_and_outside_tokens():
    # token -1 inside the response (separator / answer line) gets the outcome part only; v = R - 1
    b = make([[1, -1, 1, -2]], [0.0], step_rewards=[[0.3, 0.6]])
    c = get_estimator("pure")(b, mode="strict", baseline="none", vr_coef=1.0)
    assert c.advantages[0].tolist() == pytest.approx([0.3 - 1, -1, 0.6 - 1, -1, -1])
    zero_steps = make([[-3]], [1.0], step_rewards=[[0.9]])
    assert get_estimator("pure")(zero_steps, baseline="none").advantages[0].tolist() == [0.0, 0.0, 0.0]


def test_pure_token_baseline_by_hand():
    # two responses, one group, softmin with T huge -> rho* = rho / K (mean-form), token baseline
    b = make([[2, 1], [3]], [1.0, 0.0], group_ids=[5, 5], step_rewards=[[0.6, 0.0], [0.3, 0.0]])
    c = get_estimator("pure")(b, temperature=1e9, vr_coef=0.0)
    # row 0: rho* = [.3, 0], total .3, L0 = 3 tokens ; row 1: rho* = [.3], total .3, L1 = 3
    # b0 = total1 / L1 = .1 -> rho' = [.3 - .1*2, 0 - .1*1] = [.1, -.1] -> G = [0, -.1] ; b1 = .1 -> [0]
    assert c.advantages[0].tolist() == pytest.approx([0.0, 0.0, -0.1], abs=1e-6)
    assert c.advantages[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    # the reference's --disable_weighted_reward is exactly this mean-form: sum_form(mean_form=True)
    torch.testing.assert_close(get_estimator("sum_form")(b, mean_form=True, vr_coef=0.0).advantages, c.advantages)
    # strict: scores min = [0, .3]; row 0 G = [0, 0] - .3 ; row 1 G = [.3] - 0 ; VR RLOO = +-1
    c = get_estimator("pure")(b, mode="strict")
    assert c.advantages[0].tolist() == pytest.approx([0.7, 0.7, 0.7])
    assert c.advantages[1].tolist() == pytest.approx([-0.7, -0.7, -0.7])


# A 3-response group worked by hand from PURE's `process_experiences` (reward_baseline="token", PRM+VR, coef 1).
# Tokens: row 0 = [s0 s0 | s1] (a separator, step id -1, between steps), L0 = 4, step tokens [2, 1];
#         row 1 = [s0 x6], L1 = 6, [6];  row 2 = [s0 | s1 | s2], L2 = 5, [1, 1, 1].
# rho = [.6, .3], [.3], [-.3, .6, 0];  R = [1, 0, 1] -> v = R - 1 = [0, -1, 0], RLOO(v) = [.5, -1, .5].
# Reference baseline, a ratio of sums over the OTHER rows: b_i = sum_{j!=i} total_j / sum_{j!=i} L_j
#   b0 = (.3 + .3) / (6 + 5) = .0545454545,  b1 = (.9 + .3) / (4 + 5) = .1333333333,  b2 = 1.2 / 10 = .12
# rho'_k = rho_k - b_i * tokens(k); G_k = sum_{j>=k} rho'_j; A = G_k(t) + RLOO(v), separators get RLOO(v) only:
#   row 0: rho' = [.6 - 2 b0, .3 - b0] = [.4909090909, .2454545455] -> G = [.7363636364, .2454545455]
#   row 1: rho' = [.3 - 6 b1] = [-.5];  row 2: rho' = [-.42, .48, -.12] -> G = [-.06, .36, -.12]
SUM3 = dict(step_lens=[[2, -1, 1], [6], [1, -1, 1, -1, 1]], rewards=[1.0, 0.0, 1.0], group_ids=[7, 7, 7],
            step_rewards=[[0.6, 0.3, 0.0], [0.3, 0.0, 0.0], [-0.3, 0.6, 0.0]])


def test_sum_form_token_baseline_matches_pure_reference_by_hand():
    b = make(**SUM3)
    adv = get_estimator("sum_form")(b).advantages.double()
    assert adv[0, :4].tolist() == pytest.approx([1.2363636364, 1.2363636364, 0.5, 0.7454545455], abs=1e-6)
    assert adv[1].tolist() == pytest.approx([-1.5] * 6, abs=1e-6)
    assert adv[2, :5].tolist() == pytest.approx([0.44, 0.5, 0.86, 0.5, 0.38], abs=1e-6)
    # creditlab's earlier baseline (a mean of per-row rates over step tokens) is the named option token_per_row:
    # rates .9/3 = .3, .3/6 = .05, .3/3 = .1 -> b1 = (.3 + .1)/2 = .2 -> row 1: .3 - 6(.2) - 1 = -1.9
    old = get_estimator("sum_form")(b, baseline="token_per_row").advantages.double()
    assert old[1].tolist() == pytest.approx([-1.9] * 6, abs=1e-6)


def test_pure_softmin_default_matches_pure_reference_by_hand():
    # same group, default pure: rho* = softmax(-rho / .1) * rho over each row's steps (turn_process_reward_
    # logits_to_reward, temperature 0.1), then the same token baseline on rho*.
    #   row 0: w = [e^-6, e^-3] / (e^-6 + e^-3) = [.0474258732, .9525741268] -> rho* = [.0284555239, .2857722380]
    #   row 1: rho* = [.3];  row 2: w ~ [e^3, e^-6, e^0] / sum -> rho* = [-.2857386475, .0000705259, 0]
    #   totals [.3142277620, .3, -.2856681216]; b0 = (.3 - .2856681216)/11 = .0013028980,
    #   b1 = (.3142277620 - .2856681216)/9 = .0031732934, b2 = (.3142277620 + .3)/10 = .0614227762
    #   row 0: G = [.3103190680, .2844693400] (+.5);  row 1: G = [.3 - 6 b1] = [.2809602396] (-1)
    #   row 2: G = [-.4699364500, -.1227750260, -.0614227762] (+.5)
    b = make(**SUM3)
    adv = get_estimator("pure")(b).advantages.double()
    assert adv[0, :4].tolist() == pytest.approx([0.8103190680, 0.8103190680, 0.5, 0.7844693400], abs=1e-6)
    assert adv[1].tolist() == pytest.approx([-0.7190397604] * 6, abs=1e-6)
    assert adv[2, :5].tolist() == pytest.approx([0.0300635500, 0.5, 0.3772249740, 0.5, 0.4385772238], abs=1e-6)


def test_sum_form_step_baseline_leaks_step_count_token_does_not():
    # same tokens and same per-token reward, but response 0 splits its text into 3 steps, response 1 into 1
    b = make([[1, 1, 1], [3]], [1.0, 1.0], group_ids=[0, 0], step_rewards=[[0.2, 0.2, 0.2], [0.6, 0, 0]])
    tok = get_estimator("sum_form")(b, baseline="token").advantages
    assert tok[:, 0].tolist() == pytest.approx([0.0, 0.0], abs=1e-6)  # equal at the first token
    step = get_estimator("sum_form")(b, baseline="step").advantages
    assert step[0, 0] < step[1, 0] - 0.1  # more, smaller steps are penalized by a per-step baseline


def test_singleton_policy_with_baseline():
    b = make([[2]], [1.0], step_rewards=[[0.4]])
    assert (get_estimator("sum_form")(b).advantages == 0).all()
    assert get_estimator("sum_form")(b, singleton="raw").advantages[0].tolist() == pytest.approx([0.4, 0.4])
    with pytest.raises(ValueError, match="singleton"):
        get_estimator("pure")(b, singleton="nan")
    with pytest.raises(ValueError, match="baseline"):
        get_estimator("sum_form")(b, baseline="rloo")


# ---------------------------------------------------------------- CAPO (methods.md 8.3)
def test_capo_hand_case():
    lens = [[2, 2, 1], [2, 2, 1]]
    verdict = [[1, 0, 1], [0, 1, 1]]  # 1 ok, 0 judged wrong
    raw = make(lens, [1.0, 0.0], group_ids=[0, 1], step_rewards=verdict)
    c = get_estimator("capo")(raw, w_whole=2.0, w_process=1.0, singleton="raw")
    assert c.advantages.tolist() == [[2, 2, 1, 1, 2], [-1, -1, 0, 0, 0]]
    grouped = make(lens, [1.0, 0.0], group_ids=[0, 0], step_rewards=verdict)
    r = torch.tensor([[2, 2, 1, 1, 2], [-1, -1, 0, 0, 0]], dtype=torch.float64)
    want = (r - r.mean()) / (r.std() + 1e-6)  # mean .6, unbiased std over the 10 tokens
    torch.testing.assert_close(get_estimator("capo")(grouped).advantages.double(), want, atol=1e-6, rtol=0)


def test_capo_invariants():
    b = random_batch(n_groups=4, T=10, seed=3, empty_row_prob=0.0)
    b = b.replace(step_rewards=torch.rand(b.step_rewards.shape, generator=torch.Generator().manual_seed(0)))
    adv = get_estimator("capo")(b, w_process=0.0).advantages
    for i in range(b.B):  # no penalty: one value per response
        row = adv[i][b.response_mask[i]]
        assert torch.allclose(row, row[:1].expand_as(row))
    fracs = [get_estimator("capo")(b, flag_threshold=th).metrics["credit/flagged_token_frac"]
             for th in (1e-9, 0.5, 1.0)]  # intersection <= majority <= union
    assert fracs == sorted(fracs)
    for w, p in ((1.0, 1.0), (1.0, 2.0), (1.0, -0.1)):
        with pytest.raises(ValueError, match=r"w_whole > w_process >= 0|'w_process' must be"):
            get_estimator("capo")(b, w_whole=w, w_process=p)


# ---------------------------------------------------------------- PRIME (methods.md 8.4)
def test_prime_masked_rloo_hand_case():
    b = make([[-2], [-1]], [0.0, 0.0], group_ids=[0, 0])
    r = torch.tensor([[0.2, 0.4], [0.0, 0.0]], dtype=torch.float64)
    got = _masked_rloo_tokens(r, b, clean=False, singleton="zero")
    assert got[0].tolist() == pytest.approx([0.1, 0.5]) and got[1, 0].item() == pytest.approx(-0.3)
    clean = _masked_rloo_tokens(r, b, clean=True, singleton="zero")
    assert clean[0].tolist() == pytest.approx([0.2, 0.4]) and clean[1, 0].item() == pytest.approx(-0.3)


def test_prime_batch_norm_default_matches_prime_rl_by_hand():
    # PRIME-RL dp_prime.py: token scores are q = log pi_phi - log pi_ref (no beta), then prime_norm batch_norm
    # divides by max over the batch of |reverse cumsum q| + 1e-6. Group of 2: q0 = [.2, .4], q1 = [-.1], R = [1, 0].
    #   reverse cumsums [.6, .4] and [-.1] -> r = q / .600001: r0 = [.3333328, .6666656], r1 = [-.1666664]
    #   masked_rloo (n = 2): r * 2 - (m0 + m1), m0 = .4999992, m1 = -.1666664 -> [.3333328, .9999984], [-.6666656]
    #   final = 5 * that + 5 * RLOO(R) on the last token: [1.666664, 4.999992 + 5], [-3.333328 - 5]
    #   returns = reverse cumsum: [1.666664 + 9.999992, 9.999992] = [11.666656, 9.999992], [-8.333328];
    #   advantages = whiten over the 3 tokens
    b = make([[-2], [-1]], [1.0, 0.0], group_ids=[0, 0])
    b = b.replace(prm_logprobs=torch.tensor([[0.2, 0.4], [-0.1, 0.0]]), ref_logprobs=torch.zeros(2, 2))
    c = get_estimator("prime")(b)
    ret = torch.tensor([[11.666656, 9.999992], [-8.333328, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(c.returns.double(), ret, atol=2e-5, rtol=0)
    torch.testing.assert_close(c.advantages.double(), masked_whiten(ret, b.response_mask), atol=1e-5, rtol=0)
    # beta drops out under batch_norm (PRIME-RL's rm_scores carry no beta); prm_norm="none" uses r = beta q
    torch.testing.assert_close(get_estimator("prime")(b, beta=1.0).advantages, c.advantages)
    none = get_estimator("prime")(b, prm_norm="none")
    r = torch.tensor([[0.01, 0.02], [-0.005, 0.0]], dtype=torch.float64)  # beta q, beta = .05
    want = 5 * _masked_rloo_tokens(r, b, clean=False, singleton="zero") * b.response_mask
    want[0, 1] += 5.0
    want[1, 0] -= 5.0
    torch.testing.assert_close(none.returns.double(), want.flip(1).cumsum(1).flip(1) * b.response_mask,
                               atol=1e-6, rtol=0)


def test_prime_reduces_to_whitened_outcome_rloo_when_prm_equals_ref():
    for seed in range(10):
        b = random_batch(n_groups=4, T=8, seed=seed)
        b = b.replace(prm_logprobs=b.ref_logprobs)
        got = get_estimator("prime")(b)
        want = masked_whiten(get_estimator("rloo")(b).advantages.double(), b.response_mask)
        torch.testing.assert_close(got.advantages.double(), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.returns.double(), 5 * get_estimator("rloo")(b).advantages.double(),
                                   atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- OPRL / iStar (methods.md 6.4)
def test_oprl_hand_case():
    # iStar core_istar.py / dp_rm.py with ref_path=null: q = log pi_phi - log pi_old, pi_old = batch.logprobs
    b = make([[2], [1, 1], [3], [1]], [1.0, 0.0, 0.0, 1.0], group_ids=[0, 0, 0, 0])
    old = -torch.rand(4, 3, generator=torch.Generator().manual_seed(0)) * b.response_mask
    b = b.replace(logprobs=old, prm_logprobs=old, ref_logprobs=torch.full((4, 3), -9.0) * b.response_mask)
    adv = get_estimator("oprl")(b).advantages
    # q == 0: episode RLOO only, A^E = R_i - mean of the other three = [2/3, -2/3, -2/3, 2/3]
    assert [float(adv[i, 0]) for i in range(4)] == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # q = 1 on row 0's two tokens and row 1's first token: s = beta sum q = [.1], [.05, 0], [0], [0]
    # istar_norm batch_norm: s / (max |s| + 1e-6) = s / .100001 -> [.99999], [.499995, 0], [0], [0]
    q = torch.tensor([[1.0, 1.0, 0], [1.0, 0, 0], [0, 0, 0], [0, 0, 0]])
    b = b.replace(prm_logprobs=(old + q) * b.response_mask)
    adv = get_estimator("oprl")(b).advantages
    s0, s1 = 0.1 / 0.100001, 0.05 / 0.100001
    a_s0 = s0 - (s1 + 0 + 0 + 0) / 4  # others' steps: row1 (s1, 0), row2 (0), row3 (0)
    a_s1 = [s1 - s0 / 3, 0 - s0 / 3]  # others' steps: row0 (s0), row2, row3
    assert adv[0, :2].tolist() == pytest.approx([2 / 3 + a_s0] * 2)
    assert adv[1, :2].tolist() == pytest.approx([-2 / 3 + a_s1[0], -2 / 3 + a_s1[1]])
    # istar_norm="none": raw beta sums, as creditlab computed before (s = .1, .05)
    raw = get_estimator("oprl")(b, istar_norm="none").advantages
    assert raw[0, 0].item() == pytest.approx(2 / 3 + 0.1 - 0.05 / 4)
    # the frozen reference (ref_logprobs) plays no part: only logprobs does
    torch.testing.assert_close(get_estimator("oprl")(b.replace(ref_logprobs=None)).advantages, adv)
    assert not torch.allclose(get_estimator("oprl")(b.replace(logprobs=old - 1)).advantages, adv)


def test_oprl_reduces_to_episode_rloo_when_q_is_zero():
    for seed in range(10):
        b = random_batch(n_groups=4, T=8, seed=seed)
        b = b.replace(prm_logprobs=b.logprobs)
        torch.testing.assert_close(get_estimator("oprl")(b).advantages, get_estimator("rloo")(b).advantages)


def test_oprl_step_count_comes_from_the_data_not_the_largest_id():
    # issue 12: ids up to 2e9 used to allocate [B, 2e9]; the steps are ranked per row, so gapped and huge ids
    # give exactly the credit of ids 0, 1, 2, ...
    b = random_batch(n_groups=3, max_group=4, T=8, seed=5, empty_row_prob=0.0)
    sid = b.step_ids
    huge = torch.where(sid >= 0, sid * 700_000_000 + 3, -1)  # 3, 700000003, 1400000003, 2100000003
    got = get_estimator("oprl")(b.replace(step_ids=huge, step_rewards=None, step_labels=None, mc_values=None))
    torch.testing.assert_close(got.advantages, get_estimator("oprl")(b).advantages)
    sid2, n = dense_step_ids(huge)
    assert n <= b.T and torch.equal(sid2, sid)


# ---------------------------------------------------------------- TP-GRPO (methods.md 8.5)
def test_merge_thoughts_hand_case():
    b = make([[1, 1, 1, 1, 1], [2, 1], [1, 1]], [1.0, 0.0, 0.0],
             step_labels=[[1, 1, 0, 0, 1], [0, 0, -1, -1, -1], [1, -1, -1, -1, -1]])
    thought, start = merge_thoughts(b.step_labels, b.step_ids)
    assert thought.tolist() == [[0, 0, 1, 1, 2], [0, 0, -1, -1, -1], [0, 1, -1, -1, -1]]
    assert start[0].tolist() == [True, False, True, False, True]
    # gapped step ids: steps 0 and 3 present with equal labels -> one thought
    gapped = torch.tensor([[0, 0, 3, 3]])
    thought, _ = merge_thoughts(torch.tensor([[1, 0, 0, 1]]), gapped)
    assert thought.tolist() == [[0, -1, -1, 0]]


def test_tp_grpo_hand_case():
    # row 0 correct, thoughts {0-1: +, 2-3: -, 4: +}; row 1 wrong, one correct thought then one wrong
    b = make([[1, 1, 1, 1, 1], [1, 1, -1]], [1.0, 0.0], group_ids=[0, 0],
             step_labels=[[1, 1, 0, 0, 1], [1, 0, -1, -1, -1]])
    adv = get_estimator("tp_grpo")(b, c_pos=0.5, c_neg=0.5).advantages.double()
    units = torch.tensor([1.5, 0.5, 1.5, 0.5, -0.5], dtype=torch.float64)  # one per thought
    z = lambda x: (x - units.mean()) / (units.std() + 1e-6)  # noqa: E731
    torch.testing.assert_close(adv[0], z(torch.tensor([1.5, 1.5, 0.5, 0.5, 1.5], dtype=torch.float64)))
    torch.testing.assert_close(adv[1, :3], z(torch.tensor([0.5, -0.5, 0.0], dtype=torch.float64)))


def test_tp_grpo_uniform_labels_reduce_to_grpo():
    for seed in range(10):
        b = random_batch(n_groups=4, T=8, seed=seed)
        b = b.replace(step_labels=torch.ones_like(b.step_labels))
        for kw in ({"c_pos": 0.0, "c_neg": 0.0}, {"c_pos": 0.7}):
            if kw.get("c_pos") and (b.step_ids < 0).all(1).any():
                continue  # a shift by c_pos applies only to responses with steps
            torch.testing.assert_close(get_estimator("tp_grpo")(b, **kw).advantages,
                                       get_estimator("grpo")(b).advantages, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- loop references over awkward batches
def awkward(seed):
    """random_batch plus gapped step ids, step_id -1 holes inside responses and zero-step rows."""
    b = random_batch(n_groups=1 + seed % 5, max_group=5, T=1 + seed % 9, seed=seed, binary_rewards=seed % 3 != 2,
                     empty_row_prob=0.15)
    g = torch.Generator().manual_seed(seed + 1000)
    B, S = b.B, b.step_rewards.shape[1]
    sid = b.step_ids
    gap_rows = torch.rand(B, generator=g) < 0.3
    sid = torch.where(gap_rows[:, None] & (sid >= 0), 2 * sid + 1, sid)  # ids 1, 3, 5, ...
    holes = torch.rand(sid.shape, generator=g) < 0.15
    no_steps = torch.rand(B, generator=g) < 0.15
    sid = torch.where(holes | no_steps[:, None], -1, sid)
    labels = torch.randint(-1, 2, (B, 2 * S + 1), generator=g)
    labels = torch.where(torch.rand(labels.shape, generator=g) < 0.8, labels.clamp_min(0), labels)
    return b.replace(step_ids=sid, step_rewards=torch.rand(B, 2 * S + 1, generator=g) * 2 - 1,
                     step_labels=labels, mc_values=None).validate()


CASES = [
    ("sum_form", {}), ("sum_form", {"baseline": "step", "gamma": 0.9}), ("sum_form", {"baseline": "none"}),
    ("sum_form", {"singleton": "raw", "gamma": 0.5, "vr_coef": 0.3}),
    ("sum_form", {"baseline": "token_per_row"}), ("sum_form", {"mean_form": True, "singleton": "raw"}),
    ("pure", {}), ("pure", {"singleton": "raw"}), ("pure", {"baseline": "none"}),
    ("pure", {"mode": "strict"}), ("pure", {"mode": "strict", "singleton": "raw"}),
    ("pure", {"mode": "strict", "baseline": "none"}), ("pure", {"temperature": 0.5, "singleton": "raw"}),
    ("capo", {}), ("capo", {"w_whole": 1.0, "w_process": 0.3, "flag_threshold": 0.0, "singleton": "raw"}),
    ("prime", {}), ("prime", {"granularity": "whole", "clean_loo": True}),
    ("prime", {"prm_norm": "none", "singleton": "raw", "beta": 1.0}), ("prime", {"prm_norm": "none"}),
    ("oprl", {}), ("oprl", {"singleton": "raw", "step_coef": 0.5, "beta": 1.0}),
    ("oprl", {"istar_norm": "none", "beta": 0.3}),
    ("tp_grpo", {}), ("tp_grpo", {"adaptive": True, "c_pos": 1.0, "c_neg": 0.3, "singleton": "raw"}),
]


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_matches_loop(name, kw):
    for seed in range(25):
        b = awkward(seed)
        got = get_estimator(name)(b, **kw).advantages.double()
        want = LOOPS[name](b, **kw)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"{name} {kw} seed {seed}")


def test_prime_returns_match_loop_with_holes_in_the_mask():
    for seed in range(10):
        b = awkward(seed)
        holes = torch.rand(b.response_mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.2
        mask = b.response_mask & ~holes  # observation tokens inside multi-turn rows
        b = b.replace(response_mask=mask, step_ids=torch.where(mask, b.step_ids, -1),
                      turn_ids=torch.where(mask, b.turn_ids, -1))
        torch.testing.assert_close(get_estimator("prime")(b).advantages.double(), LOOPS["prime"](b),
                                   atol=1e-5, rtol=1e-5)
        _, ret = LOOPS["prime"](b, return_returns=True)
        torch.testing.assert_close(get_estimator("prime")(b).returns.double(), ret, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- step primitives and trajectory_score
steps = st.builds(awkward, st.integers(0, 5000))


@given(batch=steps)
def test_step_return_invariants(batch):
    present, _ = step_layout(batch.step_ids, batch.step_rewards.shape[1])
    rho = batch.step_rewards
    g_min = step_returns(rho, present, how="min")
    g_sum = step_returns(rho, present, how="sum")
    for b in range(batch.B):
        ks = present[b].nonzero()[:, 0]
        if ks.numel() == 0:
            assert (g_min[b] == 0).all() and (g_sum[b] == 0).all()
            continue
        mins = g_min[b, ks]
        assert (mins[1:] >= mins[:-1]).all()  # strict min-form is non-decreasing in k
        assert float(mins[0]) == pytest.approx(float(rho[b, ks].min()))
        assert float(g_sum[b, ks[0]]) == pytest.approx(float(rho[b, ks].double().sum()), abs=1e-9)


@given(batch=steps)
def test_trajectory_score_invariants(batch):
    sid = batch.step_ids
    rho = batch.step_rewards
    lo, mean, hi = (trajectory_score(rho, sid, h) for h in ("min", "mean", "max"))
    assert (lo <= mean + 1e-12).all() and (mean <= hi + 1e-12).all()
    probs = (rho + 1) / 2
    assert (trajectory_score(probs, sid, "product") <= trajectory_score(probs, sid, "min") + 1e-12).all()
    present, _ = step_layout(sid, rho.shape[1])
    first = step_returns(rho, present).gather(1, present.long().argmax(1, keepdim=True))[:, 0]
    torch.testing.assert_close(trajectory_score(rho, sid, "sum"), first)  # sum-form return at step 1 (gamma = 1)
    no_steps = ~present.any(1)
    for h in ("min", "sum", "mean", "last", "product", "max"):
        assert (trajectory_score(rho, sid, h, empty=-7.0)[no_steps] == -7.0).all()


def test_trajectory_score_hand_case():
    sid = torch.tensor([[0, 0, 2, 2, 5, -1], [-1, -1, -1, -1, -1, -1]])
    rho = torch.tensor([[0.9, 0.1, 0.5, 0.3, 0.8, 0.2], [0.1] * 6])
    # valid steps 0, 2, 5 (gapped ids) read columns 0, 2, 5: rho = [.9, .5, .2]
    want = {"min": 0.2, "max": 0.9, "sum": 1.6, "mean": 1.6 / 3, "last": 0.2, "product": 0.9 * 0.5 * 0.2}
    for how, v in want.items():
        assert trajectory_score(rho, sid, how).tolist() == pytest.approx([v, 0.0])
    with pytest.raises(ValueError, match="how"):
        trajectory_score(rho, sid, "median")
