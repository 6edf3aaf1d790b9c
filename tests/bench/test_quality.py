"""credit-quality: the rank-based AUROC against a pairwise loop and a hand case, the masks, and a micro run."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from creditlab.batch import RolloutBatch
from creditlab.bench.quality import (
    QualityConfig,
    auroc_brute_force,
    bootstrap_counts,
    error_masks,
    pooled_auroc,
    run_quality,
    within_response_auroc,
)
from creditlab.registry import list_estimators


def test_hand_case():
    # before = [1, 2], wrong = [0, 2]: pairs (1>0) 1, (1<2) 0, (2>0) 1, (2=2) 1/2 -> 2.5 / 4
    adv = torch.tensor([[1.0, 2.0, 0.0, 2.0, 9.0]])
    before = torch.tensor([[True, True, False, False, False]])
    wrong = torch.tensor([[False, False, True, True, False]])  # the 9.0 token belongs to neither set
    assert within_response_auroc(adv, before, wrong).tolist() == [0.625]
    assert auroc_brute_force([1, 2, 0, 2, 9], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0]) == 0.625
    assert pooled_auroc(adv, before, wrong).tolist() == [0.625]


def test_constant_advantages_give_exactly_one_half_and_empty_sets_nan():
    adv = torch.full((2, 6), -0.37)
    before = torch.tensor([[True, True, True, False, False, False], [False] * 6])
    wrong = torch.tensor([[False, False, False, True, True, False], [False, True, False, False, False, False]])
    out = within_response_auroc(adv, before, wrong)
    assert out[0].item() == 0.5 and math.isnan(out[1].item())


@given(st.integers(1, 6), st.integers(2, 12), st.integers(0, 10_000), st.booleans())
def test_rank_auroc_matches_pairwise_loop(B, T, seed, coarse):
    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(B, T, generator=g)
    if coarse:  # many ties
        adv = adv.round()
    part = torch.randint(0, 3, (B, T), generator=g)  # 0 before, 1 wrong, 2 neither
    before, wrong = part == 0, part == 1
    fast = within_response_auroc(adv, before, wrong)
    for b in range(B):
        if before[b].any() and wrong[b].any():
            ref = auroc_brute_force(adv[b].tolist(), before[b].tolist(), wrong[b].tolist())
            assert fast[b].item() == pytest.approx(ref, abs=1e-12)
        else:
            assert math.isnan(fast[b].item())
    if before.any() and wrong.any():
        pooled = auroc_brute_force(adv.flatten().tolist(), before.flatten().tolist(), wrong.flatten().tolist())
        assert pooled_auroc(adv, before, wrong).item() == pytest.approx(pooled, abs=1e-12)


def test_weighted_pool_equals_duplicated_rows():
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(4, 5, generator=g).round()
    part = torch.randint(0, 3, (4, 5), generator=g)
    before, wrong = part == 0, part == 1
    weights = torch.tensor([[2.0, 0.0, 1.0, 3.0]])
    rows = torch.tensor([0, 0, 2, 3, 3, 3])  # the same resample, written out
    ref = pooled_auroc(adv[rows], before[rows], wrong[rows])
    assert pooled_auroc(adv, before, wrong, weights).item() == pytest.approx(ref.item(), abs=1e-12)
    counts = bootstrap_counts(7, 50, seed=0)
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all()


def test_error_masks_are_positional():
    step_ids = torch.tensor([[0, 0, -1, 1, 1, -1, -1], [0, 0, -1, 1, 1, -1, -1], [0, 0, -1, 1, -1, -1, -1]])
    mask = step_ids != -1
    mask[:, 2] = True  # the newline between the steps
    batch = RolloutBatch(response_ids=torch.ones(3, 7, dtype=torch.long), response_mask=mask,
                         group_ids=torch.zeros(3, dtype=torch.long), rewards=torch.zeros(3), step_ids=step_ids)
    before, wrong = error_masks(batch, [1, None, 0])
    assert before[0].tolist() == [True, True, True, False, False, False, False]  # separator counts as "before"
    assert wrong[0].tolist() == [False, False, False, True, True, False, False]
    assert not before[1].any() and not wrong[1].any()  # no error
    assert not before[2].any() and wrong[2, :2].all()  # error at the first step: nothing before


@pytest.fixture(scope="module")
def micro_quality(tmp_path_factory):
    out = tmp_path_factory.mktemp("cq")
    cfg = QualityConfig(policy="tiny", out=str(out), prompts=4, group_size=4, max_new_tokens=24, resamples=50)
    return out, run_quality(cfg)


def test_micro_run_writes_a_row_per_registered_estimator(micro_quality):
    out, summary = micro_quality
    report = (out / "report.md").read_text()
    for name in list_estimators():
        assert f"| {name} |" in report
    rows = {r["estimator"]: r for r in summary["rows"]}
    assert set(rows) == set(list_estimators())
    assert not [r for r in rows.values() if r["note"].startswith("skipped")]  # every signal is produced
    assert json.loads((out / "quality.json").read_text())["stats"]["responses"] == 16
    if summary["stats"]["used"]:  # an untrained policy rarely writes a right step before a wrong one
        assert rows["grpo"]["within"] == 0.5
        assert (out / "auroc.png").stat().st_size > 0


def test_grpo_is_exactly_one_half_on_sampled_data():
    """A real sampled batch with every signal; split each response into a 'before' half and a 'wrong' rest."""
    from creditlab.bench.quality import sample_scored_batch, score_estimators
    from creditlab.policy import load_policy

    policy = load_policy("tiny", seed=0)
    batch, _, _ = sample_scored_batch(policy, QualityConfig(prompts=3, group_size=4, max_new_tokens=16))
    pos = torch.arange(batch.T)[None, :]
    half = (batch.response_mask.sum(1, keepdim=True) // 2).clamp_min(1)
    before = batch.response_mask & (pos < half)
    wrong = batch.response_mask & (pos >= half)
    rows, boots = score_estimators(batch, before, wrong, ["grpo", "rloo", "tp_grpo", "ucas"], resamples=20, seed=0)
    by = {r.estimator: r for r in rows}
    assert by["grpo"].within == by["grpo"].within_lo == by["grpo"].within_hi == 0.5
    assert by["rloo"].within == 0.5
    assert 0.0 <= by["ucas"].within <= 1.0 and 0.0 <= by["ucas"].pooled <= 1.0
    assert boots["grpo"].shape == (20,)


def test_cli_help(capsys):
    from creditlab.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["credit-quality", "--help"])
    assert "--out" in capsys.readouterr().out
