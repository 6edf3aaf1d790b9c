"""Stratified GRPO (methods.md §6.2) and the stratum functions in creditlab.signals.strata."""

import pytest
import torch

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.loops import LOOPS
from creditlab.sample import random_batch
from creditlab.signals.strata import strata_by_length, strata_by_pattern_count, strata_by_step_count


def make(rewards, strata, group_ids=None, lengths=None):
    B = len(rewards)
    lengths = lengths or [2] * B
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return RolloutBatch(response_ids=torch.where(mask, 3, 0).long(), response_mask=mask,
                        group_ids=torch.tensor(group_ids or [0] * B), rewards=torch.tensor(rewards),
                        strata=torch.tensor(strata)).validate()


def row_adv(credit):
    return credit.advantages[:, 0].tolist()


def test_hand_case_from_methods():
    b = make([1.0, 0, 1, 1], [0, 0, 1, 1])
    est = get_estimator("stratified")
    assert row_adv(est(b)) == pytest.approx([0.7071, -0.7071, 0, 0], abs=1e-4)
    assert row_adv(est(b, alpha=0.0)) == pytest.approx([0.5, -1.5, 0.5, 0.5], abs=1e-4)
    assert row_adv(est(b, alpha=0.5)) == pytest.approx([0.6036, -1.1036, 0.25, 0.25], abs=1e-4)
    assert torch.equal(est(b, alpha=0.0).advantages, get_estimator("grpo")(b).advantages)


def test_singleton_stratum_is_finite_zero():
    b = make([1.0, 0, 0.3, 1], [0, 0, 1, 2])
    adv = get_estimator("stratified")(b).advantages
    assert torch.isfinite(adv).all() and adv[2, 0] == 0 and adv[3, 0] == 0
    c = get_estimator("stratified")(b)
    assert c.metrics["credit/singleton_stratum_frac"] == pytest.approx(0.5)


def test_strata_are_cut_within_prompt_groups_unless_asked():
    # same stratum label in two prompt groups: within_group keeps them apart
    b = make([1.0, 0, 5, 3], [0, 0, 0, 0], group_ids=[0, 0, 1, 1])
    assert row_adv(get_estimator("stratified")(b)) == pytest.approx([0.7071, -0.7071, 0.7071, -0.7071], abs=1e-4)
    pooled = row_adv(get_estimator("stratified")(b, within_group=False))
    assert pooled == pytest.approx(row_adv(get_estimator("grpo")(b.replace(group_ids=torch.zeros(4).long()))))


@pytest.mark.parametrize("kw", [{}, {"alpha": 0.5}, {"alpha": 0.2, "within_group": False, "singleton": "raw"}])
def test_matches_loop_reference(kw):
    for seed in range(60):
        b = random_batch(n_groups=1 + seed % 5, max_group=7, T=1 + seed % 6, seed=seed,
                         binary_rewards=seed % 2 == 0, empty_row_prob=0.2)
        got = get_estimator("stratified")(b, **kw).advantages.double()
        torch.testing.assert_close(got, LOOPS["stratified"](b, **kw), atol=1e-5, rtol=1e-5)


def test_rejects_alpha_outside_unit_interval():
    with pytest.raises(ValueError, match="alpha"):
        get_estimator("stratified")(make([1.0, 0], [0, 0]), alpha=1.5)


def test_needs_strata():
    with pytest.raises(ValueError, match="strata"):
        get_estimator("stratified")(make([1.0, 0], [0, 0]).replace(strata=None))


# ---------------------------------------------------------------------------------------------- strata
def test_strata_by_step_count():
    step_ids = torch.tensor([[0, 0, 1, 2, -1], [-1, -1, -1, -1, -1], [0, 1, 1, 1, 1], [0, 0, 3, 3, -1]])
    assert strata_by_step_count(step_ids).tolist() == [3, 0, 2, 2]
    assert strata_by_step_count(step_ids, max_stratum=2).tolist() == [2, 0, 2, 2]


def test_strata_by_length():
    mask = torch.arange(10)[None, :] < torch.tensor([0, 3, 4, 9])[:, None]
    assert strata_by_length(mask, (3, 5)).tolist() == [0, 1, 1, 2]
    with pytest.raises(ValueError, match="increasing"):
        strata_by_length(mask, (5, 3))


def test_strata_by_pattern_count():
    texts = ["<search>a</search> then <search>b</search>", "no tools", "<search>x</search>"]
    assert strata_by_pattern_count(texts).tolist() == [2, 0, 1]
    assert strata_by_pattern_count(texts, max_stratum=1).tolist() == [1, 0, 1]


def test_default_strata_feed_the_estimator():
    b = random_batch(n_groups=3, max_group=5, T=8, seed=3)
    b = b.replace(strata=strata_by_step_count(b.step_ids))
    assert torch.isfinite(get_estimator("stratified")(b).advantages).all()
