"""--micro-batch-rows: gradient accumulation over micro-batches gives the minibatch's gradient exactly."""

import copy
import dataclasses

import pytest
import torch

from creditlab.policy import load_policy
from creditlab.rollout.hf import SamplingConfig, generate
from creditlab.train.config import TrainConfig
from creditlab.train.loop import ppo_update
from creditlab.train.losses import aggregate, micro_weights


def test_micro_weights_recombine_every_aggregation_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    loss = torch.arange(16, dtype=torch.float64).reshape(4, 4)
    parts = [torch.tensor([0, 2]), torch.tensor([1, 3])]
    # token-mean: 3 and 3 valid tokens -> 1/2 each; seq modes (sum-norm included): 1 and 2 non-empty rows -> 1/3, 2/3
    assert micro_weights(mask, parts, "token-mean") == [0.5, 0.5]
    assert micro_weights(mask, parts, "seq-mean-token-mean") == pytest.approx([1 / 3, 2 / 3])
    assert micro_weights(mask, parts, "seq-mean-token-sum-norm") == pytest.approx([1 / 3, 2 / 3])
    for mode in ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        whole = aggregate(loss, mask, mode, norm_constant=4.0)
        w = micro_weights(mask, parts, mode)
        split = sum(wj * aggregate(loss[p], mask[p], mode, norm_constant=4.0) for wj, p in zip(w, parts))
        torch.testing.assert_close(split, whole)
    assert micro_weights(torch.zeros(2, 3, dtype=torch.bool), [torch.tensor([0]), torch.tensor([1])]) == [1.0, 1.0]


@pytest.fixture(scope="module")
def setup():
    policy = load_policy("tiny", seed=0)
    batch = generate(policy, [policy.format_prompt(p) for p in ("1+2=", "30+4=", "7-5=")], 3,
                     SamplingConfig(max_new_tokens=10), seed=0)
    adv = torch.where(batch.response_mask, torch.randn(batch.response_mask.shape, generator=torch.Generator()
                                                       .manual_seed(1)), 0.0)
    return policy, batch, adv


def _delta(policy, batch, adv, micro, agg, minibatches, kl):
    cfg = TrainConfig()
    cfg.optim.update_bf16 = False
    cfg.optim.loss_agg, cfg.optim.micro_batch_rows, cfg.optim.minibatches = agg, micro, minibatches
    cfg.optim.max_grad_norm, cfg.optim.kl_coef = 1e9, kl
    cfg.rollout.max_new_tokens = 10
    model = copy.deepcopy(policy.model)
    ref = copy.deepcopy(policy.model) if kl else None
    if ref is not None:
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.01)
    before = [p.detach().clone() for p in model.parameters()]
    optim = torch.optim.SGD(model.parameters(), lr=1e-2)  # the step is the gradient times 1e-2
    m = ppo_update(cfg, dataclasses.replace(policy, model=model), ref, optim, batch, adv,
                   torch.Generator().manual_seed(0))
    return [p.detach() - b for p, b in zip(model.parameters(), before)], m


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("minibatches,kl", [(1, 0.0), (2, 0.1)])
def test_micro_batches_give_the_minibatch_gradient(setup, agg, minibatches, kl):
    policy, batch, adv = setup
    whole, m_whole = _delta(policy, batch, adv, 0, agg, minibatches, kl)
    split, m_split = _delta(policy, batch, adv, 2, agg, minibatches, kl)
    assert sum(float(d.abs().sum()) for d in whole) > 0  # the update moved the weights
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-4)
    assert m_split["loss/pg"] == pytest.approx(m_whole["loss/pg"], abs=1e-6)
    assert m_split["grad_norm"] == pytest.approx(m_whole["grad_norm"], rel=1e-4)
