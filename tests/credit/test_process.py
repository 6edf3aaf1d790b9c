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
    c = get_estimator("pure")(b, baseline="none", vr_coef=0.0)
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
    c = get_estimator("pure")(b, mode="softmin", baseline="none", vr_coef=0.0)
    assert step_values(c, b, 0) == pytest.approx([-0.1993, -0.1998, 0.00004], abs=1e-4)


def test_pure_outcome_and_outside_tokens():
    # token -1 inside the response (separator / answer line) gets the outcome part only; v = R - 1
    b = make([[1, -1, 1, -2]], [0.0], step_rewards=[[0.3, 0.6]])
    c = get_estimator("pure")(b, baseline="none", vr_coef=1.0)
    assert c.advantages[0].tolist() == pytest.approx([0.3 - 1, -1, 0.6 - 1, -1, -1])
    zero_steps = make([[-3]], [1.0], step_rewards=[[0.9]])
    assert get_estimator("pure")(zero_steps, baseline="none").advantages[0].tolist() == [0.0, 0.0, 0.0]


def test_pure_token_baseline_by_hand():
    # two responses, one group, softmin with T huge -> rho* = rho / K (mean-form), token baseline
    b = make([[2, 1], [3]], [1.0, 0.0], group_ids=[5, 5], step_rewards=[[0.6, 0.0], [0.3, 0.0]])
    c = get_estimator("pure")(b, mode="softmin", temperature=1e9, vr_coef=0.0)
    # row 0: rho* = [.3, 0], rate0 = .3/3 = .1 ; row 1: rho* = [.3], rate1 = .3/3 = .1
    # row 0: rho' = [.3 - .1*2, 0 - .1*1] = [.1, -.1] -> G = [0, -.1] ; row 1: rho' = [.3 - .1*3] = [0]
    assert c.advantages[0].tolist() == pytest.approx([0.0, 0.0, -0.1], abs=1e-6)
    assert c.advantages[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    # strict: scores min = [0, .3]; row 0 G = [0, 0] - .3 ; row 1 G = [.3] - 0 ; VR RLOO = +-1
    c = get_estimator("pure")(b)
    assert c.advantages[0].tolist() == pytest.approx([0.7, 0.7, 0.7])
    assert c.advantages[1].tolist() == pytest.approx([-0.7, -0.7, -0.7])


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
        with pytest.raises(ValueError, match="w_whole > w_process >= 0"):
            get_estimator("capo")(b, w_whole=w, w_process=p)


# ---------------------------------------------------------------- PRIME (methods.md 8.4)
def test_prime_masked_rloo_hand_case():
    b = make([[-2], [-1]], [0.0, 0.0], group_ids=[0, 0])
    r = torch.tensor([[0.2, 0.4], [0.0, 0.0]], dtype=torch.float64)
    got = _masked_rloo_tokens(r, b, clean=False, singleton="zero")
    assert got[0].tolist() == pytest.approx([0.1, 0.5]) and got[1, 0].item() == pytest.approx(-0.3)
    clean = _masked_rloo_tokens(r, b, clean=True, singleton="zero")
    assert clean[0].tolist() == pytest.approx([0.2, 0.4]) and clean[1, 0].item() == pytest.approx(-0.3)


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
    b = make([[2], [1, 1], [3], [1]], [1.0, 0.0, 0.0, 1.0], group_ids=[0, 0, 0, 0])
    b = b.replace(prm_logprobs=torch.zeros(4, 3), ref_logprobs=torch.zeros(4, 3))
    adv = get_estimator("oprl")(b).advantages
    assert [float(adv[i, 0]) for i in range(4)] == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    # step rewards: row 0 one step with q sum 2 -> s = .1; row 1 two steps s = [.05, 0]; rows 2, 3: 0
    q = torch.tensor([[1.0, 1.0, 0], [1.0, 0, 0], [0, 0, 0], [0, 0, 0]])
    b = b.replace(prm_logprobs=q * b.response_mask)
    adv = get_estimator("oprl")(b).advantages
    a_s0 = 0.1 - (0.05 + 0 + 0 + 0) / 4  # others' steps: row1 (.05, 0), row2 (0), row3 (0)
    a_s1 = [0.05 - 0.1 / 3, 0 - 0.1 / 3]  # others' steps: row0 (.1), row2, row3
    assert adv[0, :2].tolist() == pytest.approx([2 / 3 + a_s0] * 2)
    assert adv[1, :2].tolist() == pytest.approx([-2 / 3 + a_s1[0], -2 / 3 + a_s1[1]])


def test_oprl_reduces_to_episode_rloo_when_q_is_zero():
    for seed in range(10):
        b = random_batch(n_groups=4, T=8, seed=seed)
        b = b.replace(prm_logprobs=b.ref_logprobs)
        torch.testing.assert_close(get_estimator("oprl")(b).advantages, get_estimator("rloo")(b).advantages)


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
    ("pure", {}), ("pure", {"singleton": "raw"}), ("pure", {"baseline": "none"}),
    ("pure", {"mode": "softmin"}), ("pure", {"mode": "softmin", "temperature": 0.5, "singleton": "raw"}),
    ("pure", {"mode": "softmin", "baseline": "none"}),
    ("capo", {}), ("capo", {"w_whole": 1.0, "w_process": 0.3, "flag_threshold": 0.0, "singleton": "raw"}),
    ("prime", {}), ("prime", {"granularity": "whole", "clean_loo": True}),
    ("prime", {"prm_norm": "batch_norm", "singleton": "raw", "beta": 1.0}),
    ("oprl", {}), ("oprl", {"singleton": "raw", "step_coef": 0.5, "beta": 1.0}),
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
