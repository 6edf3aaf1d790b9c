"""Outcome-level estimators: hand-computed cases (methods.md §3), slow loop references over many random
ragged batches, and the degenerate-group policy."""


import pytest
import torch

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.ops import discounted_reverse_cumsum, masked_whiten
from creditlab.sample import random_batch


def make(rewards, lengths, group_ids=None, T=None):
    B = len(rewards)
    T = T or max(max(lengths), 1)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return RolloutBatch(
        response_ids=torch.where(mask, 3, 0).long(), response_mask=mask,
        group_ids=torch.tensor(group_ids if group_ids is not None else [0] * B),
        rewards=torch.tensor(rewards, dtype=torch.float32))


def seq_adv(credit, batch):
    """The per-row advantage of a sequence-level estimator (asserting it is constant on the row)."""
    a = credit.advantages
    out = []
    for b in range(batch.B):
        row = a[b][batch.response_mask[b]]
        assert torch.allclose(row, row[:1].expand_as(row)) if row.numel() else True
        out.append(float(row[0]) if row.numel() else 0.0)
    return out


# ---------------------------------------------------------------- hand-computed cases (methods.md §3)
def test_grpo_hand_case():
    b = make([1, 0, 0, 1], [2, 3, 1, 2])
    assert seq_adv(get_estimator("grpo")(b), b) == pytest.approx([0.8660, -0.8660, -0.8660, 0.8660], abs=1e-4)


def test_dr_grpo_hand_case():
    b = make([1, 0, 0, 1], [2, 3, 1, 2])
    assert seq_adv(get_estimator("dr_grpo")(b), b) == pytest.approx([0.5, -0.5, -0.5, 0.5], abs=1e-7)


def test_rloo_hand_case():
    b = make([1, 0, 0, 1], [2, 3, 1, 2])
    assert seq_adv(get_estimator("rloo")(b), b) == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3], abs=1e-7)


def test_reinforce_pp_hand_case():
    b = make([1, 0], [1, 3])
    adv = get_estimator("reinforce_pp")(b).advantages
    expected = torch.tensor([[1.5, 0, 0], [-0.5, -0.5, -0.5]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_gae_hand_case():
    b = make([1], [3])
    b = b.replace(token_rewards=torch.tensor([[0.0, 0.0, 1.0]]), values=torch.tensor([[0.2, 0.5, 0.8]]))
    c = get_estimator("gae")(b, whiten=False)
    torch.testing.assert_close(c.advantages, torch.tensor([[0.8, 0.5, 0.2]]))
    torch.testing.assert_close(c.returns, torch.tensor([[1.0, 1.0, 1.0]]))
    c0 = get_estimator("gae")(b, whiten=False, lam=0.0)  # lambda = 0: g = delta
    torch.testing.assert_close(c0.advantages, torch.tensor([[0.3, 0.3, 0.2]]))


def test_gae_terminal_reward_identity():
    # gamma = lambda = 1 with a terminal reward: g_t = R - V_t
    b = random_batch(n_groups=5, seed=4, binary_rewards=False)
    c = get_estimator("gae")(b, whiten=False)
    expected = torch.where(b.response_mask, b.rewards[:, None] - b.values, torch.zeros(()))
    torch.testing.assert_close(c.advantages, expected, atol=1e-5, rtol=0)


def test_degenerate_groups_policy():
    # groups: {0: [1, 0, 1]}, {7: singleton 0.7}, {9: constant [0.1, 0.1, 0.1]}, all-padding row in group 0
    b = make([1, 0, 1, 0.7, 0.1, 0.1, 0.1, 0.0], [2, 2, 1, 3, 2, 2, 2, 0], [0, 0, 0, 7, 9, 9, 9, 0])
    for name in ("grpo", "dr_grpo", "rloo"):
        adv = get_estimator(name)(b).advantages
        assert torch.isfinite(adv).all()
        assert (adv[3] == 0).all(), name  # singleton -> 0 by default
        assert (adv[4:7] == 0).all(), name  # zero-variance group -> exactly 0
        assert (adv[7] == 0).all(), name  # all-padding row
    # REINFORCE++ centres first (singleton and constant rows -> 0), then whitens the whole batch, which
    # shifts those zeros to -mean/std like every other token (as the reference does).
    adv = get_estimator("reinforce_pp")(b).advantages
    shifted = adv[3, 0]
    assert shifted != 0 and (adv[3, :3] == shifted).all() and (adv[4:7, :2] == shifted).all()
    assert (adv[7] == 0).all()
    raw = get_estimator("grpo")(b, singleton="raw").advantages
    assert raw[3, :3].tolist() == pytest.approx([0.7] * 3)
    raw = get_estimator("rloo")(b, singleton="raw").advantages
    assert raw[3, :3].tolist() == pytest.approx([0.7] * 3)
    with pytest.raises(ValueError, match="singleton"):
        get_estimator("grpo")(b, singleton="nan")


# ---------------------------------------------------------------- slow loop references
from creditlab.credit.loops.outcome import loop_gae, loop_grpo, loop_rloo, loop_whiten, to_tokens  # noqa: E402

SEEDS = range(60)


def _batch(seed):
    # alternate binary rewards (many zero-variance groups) and continuous rewards
    return random_batch(n_groups=1 + seed % 6, max_group=5, T=1 + seed % 9, seed=seed,
                        binary_rewards=seed % 2 == 0, empty_row_prob=0.15)


@pytest.mark.parametrize("singleton", ["zero", "raw"])
def test_grpo_matches_loop(singleton):
    for seed in SEEDS:
        b = _batch(seed)
        for scale, name in ((True, "grpo"), (False, "dr_grpo")):
            kw = {"singleton": singleton} if name == "dr_grpo" else {"singleton": singleton, "scale_by_std": True}
            got = get_estimator(name)(b, **kw).advantages.double()
            want = to_tokens(loop_grpo(b, scale=scale, singleton=singleton), b)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6, msg=f"{name} seed {seed}")


@pytest.mark.parametrize("singleton", ["zero", "raw"])
def test_rloo_matches_loop(singleton):
    for seed in SEEDS:
        b = _batch(seed)
        got = get_estimator("rloo")(b, singleton=singleton).advantages.double()
        torch.testing.assert_close(got, to_tokens(loop_rloo(b, singleton), b), atol=1e-6, rtol=1e-6)


def test_reinforce_pp_matches_loop():
    for seed in SEEDS:
        b = _batch(seed)
        got = get_estimator("reinforce_pp")(b).advantages.double()
        centred = to_tokens(loop_grpo(b, scale=False), b)
        torch.testing.assert_close(got, loop_whiten(centred, b.response_mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.99, 0.95), (0.9, 0.0), (0.5, 0.7)])
def test_gae_matches_loop_with_holes_in_the_mask(gamma, lam):
    for seed in range(30):
        b = random_batch(n_groups=3, T=40, seed=seed, binary_rewards=False)
        # punch observation-token holes in the mask (multi-turn rows)
        holes = torch.rand(b.response_mask.shape, generator=torch.Generator().manual_seed(seed)) < 0.2
        mask = b.response_mask & ~holes
        b = b.replace(response_mask=mask, step_ids=torch.where(mask, b.step_ids, -1),
                      turn_ids=torch.where(mask, b.turn_ids, -1),
                      token_rewards=b.token_rewards + torch.randn(b.token_rewards.shape) * 0.1)
        c = get_estimator("gae")(b, gamma=gamma, lam=lam, whiten=False)
        want_adv, want_ret = loop_gae(b, gamma, lam)
        torch.testing.assert_close(c.advantages.double(), want_adv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(c.returns.double(), want_ret, atol=1e-5, rtol=1e-5)
        whitened = get_estimator("gae")(b, gamma=gamma, lam=lam).advantages.double()
        torch.testing.assert_close(whitened, loop_whiten(want_adv, mask), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- primitives
@pytest.mark.parametrize("discount", [1.0, 0.97, 0.5, 0.0])
def test_discounted_reverse_cumsum_matches_loop(discount):
    x = torch.randn(3, 150, dtype=torch.float64)
    want = torch.zeros_like(x)
    for b in range(3):
        acc = 0.0
        for t in reversed(range(150)):
            acc = float(x[b, t]) + discount * acc
            want[b, t] = acc
    torch.testing.assert_close(discounted_reverse_cumsum(x, discount), want)


def test_masked_whiten_edge_cases():
    x = torch.tensor([[1.0, 2.0, 3.0]])
    assert (masked_whiten(x, torch.zeros(1, 3, dtype=torch.bool)) == 0).all()
    one = masked_whiten(x, torch.tensor([[False, True, False]]))
    assert one.tolist() == [[0.0, 0.0, 0.0]]
