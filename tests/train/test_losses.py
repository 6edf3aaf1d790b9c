import math

import pytest
import torch

from creditlab.train.losses import aggregate, kl_penalty, ppo_clip_loss

L = torch.tensor([[1.0, 2.0, 0.0, 0.0], [3.0, 4.0, 5.0, 6.0]])
M = torch.tensor([[True, True, False, False], [True, True, True, True]])


def test_aggregation_modes_hand_case():
    ones = torch.ones(2, 4)
    # Dr. GRPO / verl: each response's token sum over the constant, then the mean over responses: (2/8 + 4/8) / 2
    assert float(aggregate(ones, M, "seq-mean-token-sum-norm", norm_constant=8)) == pytest.approx(6 / 16)
    assert float(aggregate(L, M, "token-mean")) == pytest.approx(21 / 6)
    assert float(aggregate(L, M, "seq-mean-token-sum")) == pytest.approx((3 + 18) / 2)
    assert float(aggregate(L, M, "seq-mean-token-mean")) == pytest.approx((1.5 + 4.5) / 2)
    assert float(aggregate(L, M, "seq-mean-token-sum-norm", norm_constant=8)) == pytest.approx((3 / 8 + 18 / 8) / 2)


def test_aggregation_ignores_padding_values_and_empty_rows():
    junk = torch.where(M, L, torch.full_like(L, 1e6))
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        assert float(aggregate(junk, M, mode)) == float(aggregate(L, M, mode))
    with_empty = torch.cat([L, torch.zeros(1, 4)]), torch.cat([M, torch.zeros(1, 4, dtype=torch.bool)])
    assert float(aggregate(*with_empty, "seq-mean-token-mean")) == pytest.approx(3.0)


def test_aggregation_no_valid_tokens_is_zero_and_differentiable():
    x = torch.ones(2, 3, requires_grad=True)
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean"):
        loss = aggregate(x, torch.zeros(2, 3, dtype=torch.bool), mode)
        assert float(loss.detach()) == 0.0
        loss.backward()


def test_aggregation_errors():
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate(L, M, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(L, M, "bogus")


def _one(logp, old, adv, **kw):
    t = lambda v: torch.tensor([[float(v)]])  # noqa: E731
    lp = t(logp).requires_grad_(True)
    loss, metrics = ppo_clip_loss(lp, t(old), t(adv), torch.ones(1, 1, dtype=torch.bool), **kw)
    loss.backward()
    return float(loss.detach()), float(lp.grad), metrics


def test_ppo_unclipped_gradient_is_minus_advantage():
    loss, grad, m = _one(0.0, 0.0, 2.0)
    assert loss == pytest.approx(-2.0) and grad == pytest.approx(-2.0) and m["pg/clipfrac"] == 0


def test_ppo_clip_and_clip_higher():
    r = math.log(1.25)
    loss, grad, m = _one(r, 0.0, 1.0, clip_low=0.2, clip_high=0.2)
    assert loss == pytest.approx(-1.2) and grad == 0.0 and m["pg/clipfrac"] == 1.0
    loss, grad, _ = _one(r, 0.0, 1.0, clip_low=0.2, clip_high=0.28)  # DAPO clip-higher: not clipped
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25)
    loss, _, _ = _one(math.log(0.5), 0.0, -1.0, clip_low=0.2)  # negative advantage, ratio below 1 - eps
    assert loss == pytest.approx(0.8)


def test_dual_clip_caps_negative_advantage_loss():
    loss, _, m = _one(math.log(10.0), 0.0, -1.0)
    assert loss == pytest.approx(10.0)
    loss, grad, m = _one(math.log(10.0), 0.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and grad == 0.0 and m["pg/clipfrac_dual"] == 1.0
    loss, _, _ = _one(math.log(10.0), 0.0, 1.0, dual_clip=3.0)  # positive advantages untouched
    assert loss == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="dual_clip"):
        _one(0.0, 0.0, 1.0, dual_clip=0.5)


def test_kl_estimators_hand_values():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])  # x = ref - logp = -1
    assert float(kl_penalty(logp, ref, "k1")) == pytest.approx(1.0)
    assert float(kl_penalty(logp, ref, "k2")) == pytest.approx(0.5)
    assert float(kl_penalty(logp, ref, "k3")) == pytest.approx(math.exp(-1) + 1 - 1)
    for kind in ("k1", "k2", "k3"):
        assert float(kl_penalty(ref, ref, kind)) == 0.0
    with pytest.raises(ValueError, match="k3"):
        kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_estimates_of_kl():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, generator=g), 0)
    q = torch.softmax(torch.randn(6, generator=g), 0)
    true_kl = float((p * (p / q).log()).sum())
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, ref = p.log()[idx], q.log()[idx]
    assert float(kl_penalty(logp, ref, "k1").mean()) == pytest.approx(true_kl, abs=0.01)
    assert float(kl_penalty(logp, ref, "k3").mean()) == pytest.approx(true_kl, abs=0.01)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
