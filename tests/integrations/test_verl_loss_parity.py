"""creditlab's trainer losses against verl==0.9.1's own functions (run in .venv-verl: `make test-verl`).

`creditlab.train.losses` is the CPU trainer's loss; its docstrings name verl's modes. This pins them to verl's
`agg_loss`, `compute_policy_loss_vanilla` and `kl_penalty_forward` on ragged masks (an empty row included), mixed-sign
token advantages and ratios far enough from 1 to hit both clips and the dual clip — values and gradients.
Known, documented difference: verl caps its k3 ("low_var_kl") at 10; creditlab's k3 is uncapped (its log-ratio is
clamped to ±20), so they agree wherever k3 < 10.
"""

from __future__ import annotations

import pytest

pytest.importorskip("verl", reason="verl is not installed (make test-verl builds .venv-verl)")

import torch
from omegaconf import OmegaConf
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, kl_penalty_forward

from creditlab.train.losses import AGG_MODES, aggregate, kl_penalty, ppo_clip_loss

B, T = 7, 9


@pytest.fixture()
def inputs():
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([9, 4, 0, 7, 1, 9, 5])  # ragged, one empty row
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    logp = (old + torch.randn(B, T, generator=g) * 0.6).requires_grad_(True)  # ratios e^±1.8: every clip branch
    adv = torch.randn(B, T, generator=g)
    return logp, old, adv, mask


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregation_equals_verls_agg_loss(inputs, mode):
    logp, _, adv, mask = inputs
    loss_mat = logp * adv
    ours = aggregate(loss_mat, mask, mode, norm_constant=float(T))  # verl's default constant: the padded horizon
    theirs = agg_loss(loss_mat, mask.float(), mode)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    (g_ours,) = torch.autograd.grad(ours, logp, retain_graph=True)  # one loss_mat graph serves both
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dual_clip", [3.0, None])
@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_ppo_clip_equals_verls_vanilla_policy_loss(inputs, dual_clip, mode):
    """verl's vanilla loss always applies the dual clip (clip_ratio_c, default 3); creditlab's is opt-in, so
    dual_clip=None is compared with a clip_ratio_c too large to bind."""
    logp, old, adv, mask = inputs
    config = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                               "clip_ratio_c": dual_clip or 1e9, "global_batch_info": {}})
    ours, m = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual_clip, agg=mode)
    theirs, vm = compute_policy_loss_vanilla(old, logp, adv, mask.float(), loss_agg_mode=mode, config=config)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    (g_ours,) = torch.autograd.grad(ours, logp)
    (g_theirs,) = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-6, atol=1e-7)
    assert abs(m["pg/clipfrac"] - vm["actor/pg_clipfrac"]) < 1e-6
    assert 0.05 < m["pg/clipfrac"] < 0.95  # the clip is exercised, not a vacuous comparison
    if dual_clip is not None:
        assert m["pg/clipfrac_dual"] > 0  # and so is the dual clip


@pytest.mark.parametrize("kind,verl_name", [("k1", "k1"), ("k2", "k2"), ("k3", "low_var_kl")])
def test_kl_estimators_equal_verls_where_k3_is_below_its_cap(inputs, kind, verl_name):
    logp, old, _, _ = inputs
    ours = kl_penalty(logp, old, kind)
    theirs = kl_penalty_forward(logp, old, verl_name)
    below_cap = theirs < 10
    assert bool(below_cap.all()) or kind == "k3"
    torch.testing.assert_close(ours[below_cap], theirs[below_cap], rtol=1e-6, atol=1e-7)


def test_k3_above_verls_cap_is_the_documented_difference():
    logp, ref = torch.tensor([0.0]), torch.tensor([3.0])  # x = ref - logp = 3: k3 = e^3 - 3 - 1 = 16.09
    assert abs(float(kl_penalty(logp, ref, "k3")) - (torch.e ** 3 - 4)) < 1e-4
    assert float(kl_penalty_forward(logp, ref, "low_var_kl")) == 10.0
