import pytest
import torch

import creditlab
from creditlab import Credit, RolloutBatch, estimator, get_estimator, list_estimators
from creditlab.batch import FIELDS
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


# ---------------------------------------------------------------- hyper-parameter checks (issue 12, item 8)
def test_interval_notation():
    from creditlab.registry import Interval

    iv = Interval.parse("[0, 1)")
    assert 0.0 in iv and 0.999 in iv and 1.0 not in iv and -1e-9 not in iv and str(iv) == "[0, 1)"
    iv = Interval.parse("(-inf, inf)")
    assert -1e300 in iv and 1e300 in iv and str(iv) == "(-inf, inf)"
    assert 0.0 not in Interval.parse("(0, inf)")
    for bad in ("0, 1", "[1, 0]", "[a, 1)", "(nan, 1)"):
        with pytest.raises(ValueError, match="range"):
            Interval.parse(bad)


def test_declared_ranges_and_annotations_are_checked_at_call_time(scratch_names):
    scratch_names.append("scratch_params")
    from typing import Literal

    @estimator("scratch_params", ranges={"scale": "(0, 10]", "k": "[1, inf)", "ids": "[0, inf)"})
    def _params(batch: RolloutBatch, *, scale: float = 1.0, k: int = 2, flag: bool = False,
                mode: Literal["a", "b"] = "a", ids: tuple[int, ...] = (), cap: int | None = None) -> Credit:
        return Credit(advantages=torch.zeros(batch.response_ids.shape))

    b = random_batch(seed=0)
    _params(b, scale=10, k=3, flag=True, mode="b", ids=[0, 5], cap=None)  # all fine (int for float, list for tuple)
    cases = [({"scale": 0.0}, r"'scale' must be a finite real number in \(0, 10\], got 0.0 \(float\)"),
             ({"scale": float("nan")}, "'scale'"), ({"scale": "1"}, "'scale'"), ({"scale": True}, "'scale'"),
             ({"k": 0}, r"'k' must be an int32 integer in \[1, inf\)"), ({"k": 2.0}, "'k'"),
             ({"flag": "true"}, r"'flag' must be a bool \(True or False\), got 'true' \(str\)"),
             ({"flag": 1}, "'flag'"),
             ({"mode": "c"}, r"'mode' must be one of \['a', 'b'\], got 'c'"), ({"ids": (-1,)}, r"each in \[0, inf\)"),
             ({"cap": 1.5}, "'cap' must be an int32 integer or None"), ({"nope": 1}, "has no hyper-parameter 'nope'")]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            _params(b, **kwargs)


def test_bad_declarations_fail_at_registration(scratch_names):
    scratch_names += ["scratch_decl_a", "scratch_decl_b", "scratch_decl_c"]
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        estimator("scratch_decl_a", ranges={"typo": "[0, 1]"})(lambda batch, *, eps=1.0: None)
    with pytest.raises(ValueError, match="'eps' must be"):  # the default breaks its own range

        @estimator("scratch_decl_b", ranges={"eps": "(0, 1)"})
        def _b(batch: RolloutBatch, *, eps: float = 2.0) -> Credit: ...
    with pytest.raises(ValueError, match="not numeric"):

        @estimator("scratch_decl_c", ranges={"flag": "[0, 1]"})
        def _c(batch: RolloutBatch, *, flag: bool = False) -> Credit: ...


def test_overflow_from_large_values_names_them_instead_of_blaming_the_registry(scratch_names):
    scratch_names.append("scratch_scale")

    @estimator("scratch_scale", ranges={"scale": "[0, inf)"})
    def _scale(batch: RolloutBatch, *, scale: float = 1.0) -> Credit:
        adv = (batch.rewards.double()[:, None] * scale).float().expand(batch.response_ids.shape)
        return Credit(advantages=torch.where(batch.response_mask, adv, 0.0))

    b = random_batch(seed=1, binary_rewards=False)
    with pytest.raises(ValueError, match=r"float32 overflow.*hyper-parameter scale with \|x\| = 1e\+300"):
        _scale(b, scale=1e300)
    big = b.replace(rewards=b.rewards / b.rewards.abs().max() * 1e15)
    with pytest.raises(ValueError, match=r"float32 overflow.*RolloutBatch\.rewards with \|x\| = 1e\+15"):
        _scale(big, scale=1e24)


def test_zero_token_columns_return_an_empty_result_without_calling_the_math(scratch_names):
    scratch_names.append("scratch_boom")

    @estimator("scratch_boom")
    def _boom(batch: RolloutBatch) -> Credit:
        raise AssertionError("the math must not run on T = 0")

    b = random_batch(seed=0)
    empty = b.replace(**{f: getattr(b, f)[:, :0] for f, spec in FIELDS.items()  # every [B,T] field the batch has
                         if spec.shape == ("B", "T") and getattr(b, f) is not None})
    assert _boom(empty).advantages.shape == (b.B, 0)
