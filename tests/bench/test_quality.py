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
from creditlab.policy import load_policy
from creditlab.registry import get_spec, list_estimators


@pytest.fixture(autouse=True, scope="module")
def _single_thread():  # the tiny model's matmuls are too small for intra-op threads (see tests/rollout/conftest.py)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    cfg = QualityConfig(policy="tiny", out=str(out), prompts=4, group_size=4, max_new_tokens=24, resamples=50,
                        estimator_mc_samples=2)
    return out, run_quality(cfg)


def test_micro_run_writes_a_row_per_registered_estimator(micro_quality):
    out, summary = micro_quality
    report = (out / "report.md").read_text()
    for name in list_estimators():
        assert f"| {name} |" in report
    rows = {r["estimator"]: r for r in summary["rows"]}
    assert set(rows) == set(list_estimators())
    skipped = {n for n, r in rows.items() if r["note"].startswith("skipped")}
    # all is produced but segment-tree rollouts and HBPO's budget-prefixed prompts
    assert skipped == {n for n in rows if {"tree_node", "think_budget"} & set(get_spec(n).needs)}
    assert "budget-prefixed" in rows["hbpo"]["note"] and "--rollout tree" in rows["spo_tree"]["note"]
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


# ---------------------------------------------------------------- --reference mc
def test_spearman_matches_scipy_with_ties_and_is_zero_for_constants():
    from scipy.stats import spearmanr

    from creditlab.bench.mc_reference import spearman_rows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g).round()  # ties
    y = torch.randn(40, 6, generator=g).round()
    n = torch.randint(2, 7, (40,), generator=g)
    valid = torch.arange(6)[None, :] < n[:, None]
    rho = spearman_rows(x, y, valid)
    for b in range(40):
        xs, ys = x[b, : n[b]].numpy(), y[b, : n[b]].numpy()
        ref = spearmanr(xs, ys).statistic if len(set(xs)) > 1 and len(set(ys)) > 1 else 0.0
        assert rho[b].item() == pytest.approx(ref, abs=1e-9)
    assert spearman_rows(torch.ones(1, 3), torch.tensor([[1.0, 2, 3]]), torch.ones(1, 3).bool()).item() == 0.0


def test_reference_scores_on_a_constructed_reference():
    from creditlab.bench.mc_reference import Reference, score_against_reference, state_cuts, worst_step_masks

    # steps [0,0,-1,1,1,-1,2] -> states: prompt, start of step 1 (3), start of step 2 (6), after step 2 (7)
    steps = torch.tensor([[0, 0, -1, 1, 1, -1, 2, -1]])
    mask = torch.tensor([[True] * 8])
    assert state_cuts(steps, mask) == ([[0, 3, 6, 7]], [False])
    assert state_cuts(steps, torch.tensor([[True] * 7 + [False]])) == ([[0, 3, 6]], [True])
    true = torch.tensor([[0.2, -0.5, 0.1], [0.3, 0.3, 0.3], [0.1, 0.2, 0.0]], dtype=torch.float64)
    valid = torch.ones(3, 3, dtype=torch.bool)
    others, worst = worst_step_masks(true, valid)
    assert others[0].tolist() == [True, False, True]
    assert worst[0].tolist() == [False, True, False] and not worst[1:].any()  # no negative step in rows 1, 2
    steps3 = torch.tensor([[0, 1, 2]] * 3)
    ref = Reference(rows=torch.arange(3), steps=steps3, advantages=true, stderr=torch.zeros(3, 3), valid=valid,
                    samples=8, continuations=0)
    perfect = true.float()  # one token per step: the credit is the true advantage
    flat = torch.ones(3, 3)
    backwards = -true.float()
    rows, _ = score_against_reference({"perfect": perfect, "flat": flat, "backwards": backwards}, ref,
                                      resamples=20, seed=0, needs={}, notes={})
    by = {r.estimator: r for r in rows}
    assert by["perfect"].spearman == pytest.approx(1.0) and by["perfect"].worst_auroc == 1.0
    assert by["flat"].spearman == 0.0 and by["flat"].worst_auroc == 0.5
    assert by["backwards"].spearman == pytest.approx(-1.0) and by["backwards"].worst_auroc == 0.0


def test_reference_recovers_closed_form_step_advantages():
    """The uniform tiny policy and a task rewarding any "7": V(state) = (1 - .98^budget) / 2 without a 7, else 1."""
    from creditlab.bench.mc_reference import estimate_reference
    from creditlab.rollout.hf import SamplingConfig
    from creditlab.signals.produce import SignalContext
    from creditlab.signals.steps import Segmenter
    from creditlab.tasks import Problem, Score

    class Seven:
        def score(self, problem, response):
            return Score(reward=float("7" in response), correct="7" in response)

    policy = load_policy("tiny", seed=0)
    with torch.no_grad():
        policy.model.get_output_embeddings().weight.zero_()
    texts = ["abc\nde7\nfgh", "abc\ndef\nghi"]
    ids = [policy.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    p_ids, p_mask = policy.encode_prompts(["q\n", "q\n"])
    batch = RolloutBatch(response_ids=torch.tensor(ids), response_mask=torch.ones(2, 11, dtype=torch.bool),
                         group_ids=torch.tensor([0, 1]), rewards=torch.tensor([1.0, 0.0]), prompt_ids=p_ids,
                         prompt_mask=p_mask, texts=texts)
    ctx = SignalContext(policy=policy, problems=[Problem("q", "7")] * 2, task=Seven(), seed=0)
    steps = Segmenter("newline").segment(batch, ctx).step_ids
    ref = estimate_reference(batch, ctx, steps, responses=0, samples=400, sampling=SamplingConfig(max_new_tokens=20),
                             seed=0)

    def v(c):  # budget 20 - c tokens after the prefix
        return 0.5 * (1 - 0.98 ** (20 - c))

    # states: prompt (0), before step 1 (4), before step 2 (8); the last step ends the response (value = reward)
    expected = torch.tensor([[v(4) - v(0), 1 - v(4), 0.0], [v(4) - v(0), v(8) - v(4), 0.0 - v(8)]],
                            dtype=torch.float64)
    assert ref.valid.all() and ref.samples == 400
    assert ((ref.advantages - expected).abs() <= 4 * ref.stderr + 1e-9).all()
    assert ref.advantages[0, 1].item() > 0.7  # the step that writes the 7 gets the credit
    assert ref.stderr[0, 2].item() == 0.0  # 1 - 1: both states hold a 7, every continuation scores 1


def test_mc_reference_micro_run(tmp_path):
    out = tmp_path / "mc"
    cfg = QualityConfig(policy="tiny", out=str(out), prompts=3, group_size=3, max_new_tokens=20, resamples=20,
                        reference="mc", mc_samples=2, mc_responses=0, estimator_mc_samples=2,
                        estimators="grpo,vineppo,spo_chain,spo_tree,tempo")
    summary = run_quality(cfg)
    rows = {r["estimator"]: r for r in summary["rows"]}
    assert list(rows) == ["grpo", "vineppo", "spo_chain", "spo_tree", "tempo"]
    assert rows["spo_tree"]["note"].startswith("skipped")
    assert "K = 2 continuations per state" in (out / "report.md").read_text()
    assert summary["stats"]["estimator_continuations"] > 0
    if summary["stats"]["spearman_responses"]:
        assert rows["grpo"]["spearman"] == 0.0
    with pytest.raises(ValueError, match="--mc-samples"):
        run_quality(QualityConfig(policy="tiny", out=str(out), reference="mc", mc_samples=0))
