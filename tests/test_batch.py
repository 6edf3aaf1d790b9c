"""Every validate() rule rejects bad input with a ValueError that names the offending field."""

import pytest
import torch

from creditlab import RolloutBatch
from creditlab.batch import FIELDS, fields_table
from creditlab.sample import random_batch


def good(**changes):
    b = random_batch(n_groups=3, max_group=3, T=6, seed=1)
    return b.replace(**changes)


B_T = good().response_ids.shape


def _nan_at(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


CASES = {
    "missing rewards": (lambda b: b.replace(rewards=None), "rewards"),
    "ids 1-D": (lambda b: b.replace(response_ids=b.response_ids[:, 0]), "response_ids"),
    "ids float": (lambda b: b.replace(response_ids=b.response_ids.float()), "response_ids"),
    "ids not a tensor": (lambda b: b.replace(response_ids=b.response_ids.tolist()), "response_ids"),
    "empty batch": (lambda b: b.select(torch.tensor([], dtype=torch.long)), "response_ids"),
    "mask long": (lambda b: b.replace(response_mask=b.response_mask.long()), "response_mask"),
    "mask shape": (lambda b: b.replace(response_mask=b.response_mask[:, :-1]), "response_mask"),
    "group_ids length": (lambda b: b.replace(group_ids=b.group_ids[:-1]), "group_ids"),
    "group_ids float": (lambda b: b.replace(group_ids=b.group_ids.float()), "group_ids"),
    "group_ids 2-D": (lambda b: b.replace(group_ids=b.group_ids[:, None]), "group_ids"),
    "rewards NaN": (lambda b: b.replace(rewards=_nan_at(b.rewards)), "rewards"),
    "rewards inf": (lambda b: b.replace(rewards=b.rewards.clone().fill_(float("inf"))), "rewards"),
    "rewards [B,1]": (lambda b: b.replace(rewards=b.rewards[:, None]), "rewards"),
    "rewards long": (lambda b: b.replace(rewards=b.rewards.long()), "rewards"),
    "rewards length": (lambda b: b.replace(rewards=b.rewards[1:]), "rewards"),
    "logprobs T+1": (lambda b: b.replace(logprobs=torch.zeros(B_T[0], B_T[1] + 1)), "logprobs"),
    "entropies NaN": (lambda b: b.replace(entropies=_nan_at(b.entropies)), "entropies"),
    "values long": (lambda b: b.replace(values=b.values.long()), "values"),
    "texts length": (lambda b: b.replace(texts=b.texts[:-1]), "texts"),
    "step_ids outside mask": (lambda b: b.replace(step_ids=torch.zeros_like(b.step_ids)), "step_ids"),
    "step_ids < -1": (lambda b: b.replace(step_ids=torch.where(b.response_mask, -2, -1)), "step_ids"),
    "step_rewards too narrow": (lambda b: b.replace(step_rewards=b.step_rewards[:, :1]), "step_rewards"),
    "step_labels range": (lambda b: b.replace(step_labels=b.step_labels + 5), "step_labels"),
    "strata B mismatch": (lambda b: b.replace(strata=torch.zeros(B_T[0] + 2, dtype=torch.long)), "strata"),
    "step_rewards S mismatch with mc_values": (
        lambda b: b.replace(mc_values=torch.zeros(B_T[0], b.step_rewards.shape[1] + 1)), "mc_values"),
    # issue 12: ids are vocabulary indices (ktae gave silently wrong credit for negative ids) ...
    "ids negative": (lambda b: b.replace(response_ids=torch.where(b.response_mask, -3, b.response_ids)),
                     "response_ids"),
    "ids >= 2^31": (lambda b: b.replace(response_ids=torch.where(b.response_mask, 2**31, b.response_ids)),
                    "response_ids"),
    "step_ids >= 2^31": (lambda b: b.replace(step_ids=torch.where(b.response_mask, 2**31, -1), step_rewards=None,
                                             step_labels=None, mc_values=None), "step_ids"),
    # ... and float fields must fit what float32 credit can hold (rewards of 3e38 used to overflow the output)
    "rewards 3e38": (lambda b: b.replace(rewards=torch.full_like(b.rewards, 3e38)), "rewards"),
    "rewards 1e200 float64": (lambda b: b.replace(rewards=torch.full(b.rewards.shape, 1e200, dtype=torch.float64)),
                              "rewards"),
    "values -2e15": (lambda b: b.replace(values=b.values - 2e15), "values"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_validate_names_the_field(name):
    mutate, field = CASES[name]
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        mutate(good()).validate()


def test_valid_batch_passes_and_chains():
    b = good()
    assert b.validate() is b


def test_padding_must_be_finite_but_may_hold_any_value():
    b = good()
    junk = torch.where(b.response_mask, b.logprobs, torch.full_like(b.logprobs, 123.0))
    b.replace(logprobs=junk).validate()


def test_select_keeps_every_field_consistent():
    b = good()
    idx = torch.tensor([2, 0])
    s = b.select(idx)
    assert s.validate().B == 2
    assert torch.equal(s.response_ids, b.response_ids[idx])
    assert s.texts == [b.texts[2], b.texts[0]]


def test_every_field_is_documented_once():
    table = fields_table()
    for name, spec in FIELDS.items():
        assert f"`{name}`" in table and spec.doc and spec.producer
    assert set(FIELDS) <= set(RolloutBatch.__dataclass_fields__)


def test_ids_outside_the_mask_may_hold_anything():
    # padding is never read: -100 (a common label pad) outside response_mask is fine
    b = good()
    b.replace(response_ids=torch.where(b.response_mask, b.response_ids, -100)).validate()


def test_magnitude_limit_is_inclusive():
    from creditlab.batch import MAX_ABS

    b = good()
    b.replace(rewards=torch.full_like(b.rewards, -MAX_ABS)).validate()
    with pytest.raises(ValueError, match=r"RolloutBatch\.rewards has \|value\| up to 1\.1e\+15"):
        b.replace(rewards=torch.full(b.rewards.shape, MAX_ABS * 1.1, dtype=torch.float64)).validate()


def test_zero_token_columns_validate_with_and_without_steps():
    # issue 12, item 9: T = 0 used to crash inside validate() when step_ids was present
    b = good()
    cut = {n: getattr(b, n)[:, :0] for n, spec in FIELDS.items()
           if spec.shape == ("B", "T") and getattr(b, n) is not None}
    empty = b.replace(**cut)
    assert empty.validate().T == 0 and empty.step_ids is not None
    assert empty.replace(step_ids=None, step_rewards=None, step_labels=None, mc_values=None).validate().T == 0
