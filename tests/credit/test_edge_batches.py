"""Degenerate and extreme batches through every registered estimator (issue 12, items 9 and 10).

- T = 0 (every response empty), with and without step fields: a defined empty result, advantages [B, 0].
- Inputs as large as `RolloutBatch.validate()` accepts (|x| = MAX_ABS in every float field): finite credit or a
  one-line ValueError that names what overflowed -- never the registry's "a bug: please report it".
- Beyond MAX_ABS (rewards of 3e38, float64 rewards of 1e200): validate() names the field.
"""

import pytest
import torch

from creditlab import RolloutBatch, get_estimator, list_estimators
from creditlab.batch import FIELDS, MAX_ABS
from creditlab.registry import get_spec
from creditlab.sample import random_batch

ALL = list_estimators()


def empty_batch(with_steps: bool) -> RolloutBatch:
    """B = 4 rows, T = 0 columns, every optional field present (S = 2 step columns when `with_steps`)."""
    full = random_batch(n_groups=2, max_group=2, T=3, seed=1, min_group=2)
    changes = {}
    for name, spec in FIELDS.items():
        v = getattr(full, name)
        if isinstance(v, torch.Tensor) and spec.shape == ("B", "T"):
            changes[name] = v[:, :0]
    if not with_steps:
        changes.update(step_ids=None, step_rewards=None, step_labels=None, mc_values=None)
    return full.replace(**changes)


@pytest.mark.parametrize("with_steps", [True, False])
@pytest.mark.parametrize("name", ALL)
def test_zero_token_columns_give_an_empty_result(name, with_steps):
    b = empty_batch(with_steps)
    assert b.validate().T == 0
    missing = [f for f in get_spec(name).needs if getattr(b, f) is None]
    if missing:  # without step fields, an estimator that reads them says which one it needs
        with pytest.raises(ValueError, match=rf"needs RolloutBatch\.{missing[0]}"):
            get_estimator(name)(b)
        return
    credit = get_estimator(name)(b)
    assert credit.advantages.shape == (b.B, 0) and credit.advantages.dtype == torch.float32


def _scaled(batch: RolloutBatch, size: float) -> RolloutBatch:
    """Every float field of `batch` rescaled so that its largest |x| is `size` (its pattern kept)."""
    changes = {}
    for name, spec in FIELDS.items():
        v = getattr(batch, name)
        if spec.kind == "float" and isinstance(v, torch.Tensor):
            top = v.abs().max().clamp_min(1e-30)
            changes[name] = (v.double() * (size / top)).clamp(-size, size).to(v.dtype)
    return batch.replace(**changes)


@pytest.mark.parametrize("name", ALL)
def test_largest_accepted_inputs_give_finite_credit_or_a_named_error(name):
    for seed in range(3):
        b = _scaled(random_batch(n_groups=3, max_group=4, T=6, seed=seed, binary_rewards=False), MAX_ABS).validate()
        try:
            adv = get_estimator(name)(b).advantages
        except ValueError as e:  # a float32 overflow, named
            assert "overflow" in str(e) and "RolloutBatch." in str(e) and "\n" not in str(e), str(e)
            continue
        assert torch.isfinite(adv).all()


@pytest.mark.parametrize("value,dtype", [(3e38, torch.float32), (-3e38, torch.float32), (1e200, torch.float64),
                                         (MAX_ABS * 1.01, torch.float32)])
def test_rewards_beyond_the_limit_are_refused_naming_the_field(value, dtype):
    b = random_batch(n_groups=2, max_group=3, T=4, seed=0)
    bad = b.replace(rewards=torch.full((b.B,), value, dtype=dtype))
    for name in ("grpo", "rloo", "sum_form", "prime"):
        with pytest.raises(ValueError, match=r"RolloutBatch\.rewards has \|value\| up to"):
            get_estimator(name)(bad)


def test_large_logprobs_are_refused_naming_the_field():
    b = random_batch(n_groups=2, max_group=3, T=4, seed=0)
    with pytest.raises(ValueError, match=r"RolloutBatch\.prm_logprobs"):
        get_estimator("prime")(b.replace(prm_logprobs=b.prm_logprobs * 1e20))
