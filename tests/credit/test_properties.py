"""Properties every registered estimator must satisfy (hypothesis over random ragged batches).

Estimators registered by later modules are picked up automatically; `random_batch` fills every optional
field, so each estimator finds what it needs.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from creditlab import get_estimator, list_estimators
from creditlab.batch import FIELDS
from creditlab.sample import random_batch

ALL = list_estimators()
OUTCOME = ["grpo", "dr_grpo", "rloo", "reinforce_pp"]

batches = st.builds(
    random_batch,
    n_groups=st.integers(1, 5), max_group=st.integers(1, 6), T=st.integers(1, 10),
    seed=st.integers(0, 10_000), binary_rewards=st.booleans(), empty_row_prob=st.sampled_from([0.0, 0.3]),
)


def run(name, batch):
    return get_estimator(name)(batch).advantages


@pytest.mark.parametrize("name", ALL)
@given(batch=batches)
def test_finite_and_zero_outside_mask(name, batch):
    adv = run(name, batch)
    assert adv.shape == batch.response_ids.shape
    assert torch.isfinite(adv).all()
    assert (adv[~batch.response_mask] == 0).all()


def _pad(batch, extra, junk_seed):
    """Append `extra` padding columns and overwrite every padding position with finite junk."""
    g = torch.Generator().manual_seed(junk_seed)
    B = batch.B
    mask = torch.cat([batch.response_mask, torch.zeros(B, extra, dtype=torch.bool)], 1)
    changes = {"response_mask": mask}
    for name, spec in FIELDS.items():
        v = getattr(batch, name)
        if v is None or spec.shape != ("B", "T") or name == "response_mask":
            continue
        v = torch.cat([v, torch.zeros(B, extra, dtype=v.dtype)], 1)
        if name in ("step_ids", "turn_ids"):
            junk = torch.full_like(v, -1)
        elif v.dtype == torch.bool:
            junk = torch.rand(v.shape, generator=g) < 0.5
        elif v.dtype == torch.long:
            junk = torch.randint(0, 50, v.shape, generator=g)
        else:
            junk = torch.randn(v.shape, generator=g).to(v.dtype) * 7
        changes[name] = torch.where(mask, v, junk)
    return batch.replace(**changes).validate()


@pytest.mark.parametrize("name", ALL)
@given(batch=batches, extra=st.integers(0, 5), junk=st.integers(0, 99))
def test_padding_invariance(name, batch, extra, junk):
    before = run(name, batch)
    after = run(name, _pad(batch, extra, junk))
    torch.testing.assert_close(after[:, : batch.T], before, atol=1e-5, rtol=1e-5)
    assert (after[:, batch.T:] == 0).all()


@pytest.mark.parametrize("name", ALL)
@given(batch=batches, seed=st.integers(0, 999))
def test_row_permutation_equivariance(name, batch, seed):
    perm = torch.randperm(batch.B, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(run(name, batch.select(perm)), run(name, batch)[perm], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
@given(batch=batches, seed=st.integers(0, 999))
def test_group_label_permutation_invariance(name, batch, seed):
    uniq = torch.unique(batch.group_ids)
    new_labels = torch.randperm(1000, generator=torch.Generator().manual_seed(seed))[: uniq.numel()] - 500
    relabelled = new_labels[torch.searchsorted(uniq, batch.group_ids)]
    torch.testing.assert_close(run(name, batch.replace(group_ids=relabelled)), run(name, batch),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", OUTCOME)
@given(batch=batches, value=st.floats(-3, 3))
def test_all_equal_rewards_give_zero(name, batch, value):
    adv = run(name, batch.replace(rewards=torch.full_like(batch.rewards, value)))
    assert (adv == 0).all()


@pytest.mark.parametrize("name", ["grpo", "rloo", "dr_grpo"])
@given(batch=batches)
def test_group_advantages_sum_to_zero(name, batch):
    adv = run(name, batch.replace(response_mask=torch.ones_like(batch.response_mask),
                                  step_ids=None, step_rewards=None, step_labels=None, mc_values=None))
    per_row = adv[:, 0].double()
    sums = torch.zeros(int(batch.group_ids.max()) + 1, dtype=torch.float64).index_add_(0, batch.group_ids, per_row)
    assert sums.abs().max() < 1e-4


@given(batch=batches, c=st.floats(0.1, 10), d=st.floats(-5, 5))
def test_grpo_affine_invariance(batch, c, d):
    base = run("grpo", batch)
    moved = run("grpo", batch.replace(rewards=batch.rewards * c + d))
    torch.testing.assert_close(moved, base, atol=1e-3, rtol=1e-3)
