import pytest
import torch

import creditlab
from creditlab import Credit, RolloutBatch, estimator, get_estimator, list_estimators
from creditlab.registry import _REGISTRY
from creditlab.sample import random_batch


@pytest.fixture
def scratch_names():
    names: list[str] = []
    yield names
    for n in names:
        _REGISTRY.pop(n, None)


def test_top_level_api():
    for name in ("RolloutBatch", "Credit", "estimator", "get_estimator", "list_estimators"):
        assert hasattr(creditlab, name)
    assert {"grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"} <= set(list_estimators())
    assert list_estimators() == sorted(list_estimators())


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError, match="grpo") as e:
        get_estimator("grpoo")
    assert "grpoo" in str(e.value) and "rloo" in str(e.value)


def test_duplicate_name_fails(scratch_names):
    with pytest.raises(ValueError, match=r"already registered.*grpo"):
        estimator("grpo")(lambda batch: None)


def test_unknown_needs_field_fails():
    with pytest.raises(ValueError, match="entropy_typo"):
        estimator("scratch_bad_needs", needs=("entropy_typo",))


def test_missing_needed_field_names_field_and_producer():
    b = random_batch(seed=0).replace(values=None)
    with pytest.raises(ValueError, match=r"'gae' needs RolloutBatch\.values.*produced by"):
        get_estimator("gae")(b)


def test_registry_validates_before_calling():
    b = random_batch(seed=0)
    bad = b.replace(rewards=torch.full_like(b.rewards, float("nan")))
    with pytest.raises(ValueError, match="rewards"):
        get_estimator("grpo")(bad)
    with pytest.raises(TypeError, match="RolloutBatch"):
        get_estimator("grpo")({"rewards": b.rewards})


def test_output_contract_is_enforced(scratch_names):
    scratch_names += ["scratch_nan", "scratch_leak"]

    @estimator("scratch_nan")
    def _nan(batch: RolloutBatch) -> Credit:
        return Credit(advantages=torch.full(batch.response_ids.shape, float("nan")))

    @estimator("scratch_leak")
    def _leak(batch: RolloutBatch) -> Credit:
        return Credit(advantages=torch.ones(batch.response_ids.shape))

    b = random_batch(seed=3)
    with pytest.raises(RuntimeError, match="non-finite"):
        _nan(b)
    with pytest.raises(RuntimeError, match="outside response_mask"):
        get_estimator("scratch_leak")(b)


def test_estimators_run_without_grad():
    b = random_batch(seed=0)
    b = b.replace(rewards=b.rewards.clone().requires_grad_(True))
    assert not get_estimator("grpo")(b).advantages.requires_grad
