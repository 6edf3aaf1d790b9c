"""Token-selective shaping (methods.md §5): hicra, hicra_entropy, ktae, ucas.

Hand-computed cases from methods.md, slow loop references over many random ragged batches (singleton and
zero-variance groups, all-padding rows), the Fisher exact test against exact integer arithmetic (and scipy
when installed), and each method's invariants.
"""

import itertools
import math

import pytest
import torch

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.loops import LOOPS
from creditlab.credit.loops.planning import fisher_p_exact, loop_ktae_weights
from creditlab.credit.planning import fisher_exact_two_sided, ktae_token_weights, ucas_token_advantage
from creditlab.sample import random_batch


def make(rewards, lengths, group_ids=None, T=None, **fields):
    B = len(rewards)
    T = T or max(max(lengths), 1)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return RolloutBatch(
        response_ids=torch.where(mask, 3, 0).long(), response_mask=mask,
        group_ids=torch.tensor(group_ids if group_ids is not None else [0] * B),
        rewards=torch.tensor(rewards, dtype=torch.float32), **fields).validate()


def ragged(seed):
    """Small random ragged batches: singletons, zero-variance groups, empty rows, small vocab (shared tokens)."""
    return random_batch(n_groups=1 + seed % 5, max_group=6, T=1 + seed % 13, seed=seed, vocab=2 + seed % 9,
                        binary_rewards=seed % 3 != 0, empty_row_prob=0.2)


# ---------------------------------------------------------------------------------------------- loops
CASES = [
    ("hicra", {}), ("hicra", {"alpha": 0.7, "scale_by_std": False, "singleton": "raw"}),
    ("hicra_entropy", {}), ("hicra_entropy", {"alpha": 0.5, "top_frac": 0.5, "length_gate": False}),
    ("ktae", {}), ("ktae", {"alpha": 0.3, "beta": 2.0, "gamma_tf": 0.5, "top": 2.0, "ignore_token_ids": (1, 4)}),
    ("ktae", {"alpha": 0.0, "k1": 1.2, "b": 0.75, "correct_threshold": 0.5, "singleton": "raw"}),
    ("ucas", {}), ("ucas", {"beta_pos": 0.5, "beta_neg": 0.1, "lam": 0.3, "penalize_zero_signal": False}),
]


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_loop_reference(name, kw):
    for seed in range(60):
        b = ragged(seed)
        got = get_estimator(name)(b, **kw).advantages.double()
        torch.testing.assert_close(got, LOOPS[name](b, **kw), atol=1e-5, rtol=1e-5, msg=f"{name} seed {seed}")


# ---------------------------------------------------------------------------------------------- HICRA
def test_hicra_hand_case():
    # A = [+1, +1, -1, -1] (R - mean with scale_by_std=False), planning tokens S = {0, 2}
    b = make([1, 1, -1, -1], [1, 1, 1, 1], planning_mask=torch.tensor([[True], [False], [True], [False]]))
    adv = get_estimator("hicra")(b, scale_by_std=False).advantages[:, 0]
    assert adv.tolist() == pytest.approx([1.2, 1.0, -0.8, -1.0])


def test_hicra_reduces_to_grpo_and_never_flips_sign():
    for seed in range(30):
        b = ragged(seed)
        grpo = get_estimator("grpo")(b).advantages
        assert torch.equal(get_estimator("hicra")(b, alpha=0.0).advantages, grpo)
        empty = b.replace(planning_mask=torch.zeros_like(b.planning_mask))
        assert torch.equal(get_estimator("hicra")(empty).advantages, grpo)
        shaped = get_estimator("hicra")(b, alpha=0.99).advantages
        assert torch.equal(torch.sign(shaped), torch.sign(grpo))
        # planning tokens change by exactly alpha|A|, nothing else changes
        plan = b.planning_mask & b.response_mask
        torch.testing.assert_close(shaped[~plan], grpo[~plan])


@pytest.mark.parametrize("alpha", [1.0, 1.5, -0.1])
def test_hicra_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(ValueError, match="alpha"):
        get_estimator("hicra")(ragged(1), alpha=alpha)


def test_hicra_needs_planning_mask():
    b = ragged(2).replace(planning_mask=None)
    with pytest.raises(ValueError, match=r"planning_mask.*strategic"):
        get_estimator("hicra")(b)


def test_hicra_entropy_hand_case():
    # group {row0: R=1, L=5, H=0..4; row1: R=0, L=1}; mean length 3 -> row0 is long and correct.
    # tau = 0.7 quantile of [0,1,2,3,4] = 2.8 -> tokens 3 and 4 get x(1+alpha); row1 (negative) untouched.
    ent = torch.tensor([[0.0, 1, 2, 3, 4], [9, 0, 0, 0, 0]])
    b = make([1, 0], [5, 1], entropies=ent)
    adv = get_estimator("hicra_entropy")(b).advantages
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(adv[0].double(), torch.tensor([a, a, a, 1.2 * a, 1.2 * a], dtype=torch.float64),
                               atol=1e-6, rtol=1e-6)
    assert adv[1, 0] == pytest.approx(-a) and (adv[1, 1:] == 0).all()
    gated = get_estimator("hicra_entropy")(make([1, 0], [5, 9], T=9, entropies=torch.rand(2, 9))).advantages
    assert torch.equal(gated, get_estimator("grpo")(make([1, 0], [5, 9], T=9)).advantages)  # row0 not long


# ---------------------------------------------------------------------------------------------- KTAE
def test_fisher_matches_exact_integer_arithmetic():
    tables = [(a, b, nc, nw) for nc in range(1, 7) for nw in range(1, 7)
              for a in range(nc + 1) for b in range(nw + 1)]
    a, b, nc, nw = (torch.tensor(col, dtype=torch.float64) for col in zip(*tables))
    p, is_one = fisher_exact_two_sided(a, b, nc, nw)
    want = torch.tensor([fisher_p_exact(a_, b_, nc_ - a_, nw_ - b_) for a_, b_, nc_, nw_ in tables],
                        dtype=torch.float64)
    torch.testing.assert_close(p, want, atol=1e-12, rtol=1e-10)
    assert torch.equal(is_one, want == 1.0)


def test_fisher_matches_scipy_if_installed():
    stats = pytest.importorskip("scipy.stats")
    tables = [(a, b, nc, nw) for nc, nw in itertools.product([1, 3, 8, 20], [2, 5, 16])
              for a in range(0, nc + 1, max(1, nc // 4)) for b in range(0, nw + 1, max(1, nw // 4))]
    a, b, nc, nw = (torch.tensor(col, dtype=torch.float64) for col in zip(*tables))
    p, _ = fisher_exact_two_sided(a, b, nc, nw)
    want = [stats.fisher_exact([[a_, b_], [nc_ - a_, nw_ - b_]]).pvalue for a_, b_, nc_, nw_ in tables]
    torch.testing.assert_close(p, torch.tensor(want, dtype=torch.float64), atol=1e-9, rtol=1e-7)


def _weights(b, **kw):
    return ktae_token_weights(b, **kw)


def test_ktae_label_swap_flips_every_weight():
    for seed in range(40):
        b = ragged(seed).replace(rewards=torch.randint(0, 2, (ragged(seed).B,),
                                                        generator=torch.Generator().manual_seed(seed)).float())
        w = _weights(b)
        swapped = _weights(b.replace(rewards=1 - b.rewards))
        torch.testing.assert_close(swapped, -w, atol=1e-12, rtol=0)


def test_ktae_symmetric_token_gets_zero_and_one_sided_group_gets_nothing():
    # token 7 appears once in each response; token 5 only in the correct one -> positive, 6 only in the wrong one
    ids = torch.tensor([[7, 5, 5], [7, 6, 6]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    b = RolloutBatch(response_ids=ids, response_mask=mask, group_ids=torch.tensor([0, 0]),
                     rewards=torch.tensor([1.0, 0.0]))
    w = _weights(b)
    assert w[0, 0] == 0 and w[1, 0] == 0
    assert w[0, 1] > 0 and w[1, 1] < 0 and w[0, 1] == pytest.approx(-float(w[1, 1]))
    assert (_weights(b.replace(rewards=torch.tensor([1.0, 1.0]))) == 0).all()  # one-sided: w == 0
    assert (_weights(b.replace(group_ids=torch.tensor([0, 1]))) == 0).all()  # singletons: w == 0
    adv = get_estimator("ktae")(b.replace(rewards=torch.tensor([1.0, 1.0]))).advantages
    assert (adv == 0).all()


def test_ktae_weights_bounded_and_hyperparameters_honoured():
    for seed in range(30):
        b = ragged(seed)
        w1 = _weights(b)
        assert (w1.abs() <= 1.0).all()
        torch.testing.assert_close(_weights(b, top=0.3), 0.3 * w1)  # top scales w exactly
        assert (_weights(b, top=0.3).abs() <= 0.3).all()
        wi = _weights(b, ignore_token_ids=(0, 2))
        ids = b.response_ids
        assert (wi[(ids == 0) | (ids == 2)] == 0).all()
        keep = (ids != 0) & (ids != 2)
        assert torch.equal(wi[keep], w1[keep])
    b = ragged(7)
    assert not torch.equal(_weights(b, alpha=0.1), _weights(b))
    assert not torch.equal(_weights(b, beta=3.0), _weights(b))
    assert not torch.equal(_weights(b, gamma_tf=0.2), _weights(b))


def test_ktae_strictly_inside_top_when_tokens_occur_on_both_sides():
    # every token occurs on both sides -> moderate z -> |w| < top strictly; token 2 is missing from one wrong
    # response (presence 2/2 vs 1/2) so it gets w > 0; tokens present everywhere get F = IG = 0 -> w = 0.
    ids = torch.tensor([[1, 2, 3, 1], [1, 3, 3, 3], [2, 1, 3, 2], [2, 3, 1, 3]])
    b = RolloutBatch(response_ids=ids, response_mask=torch.ones(4, 4, dtype=torch.bool),
                     group_ids=torch.zeros(4, dtype=torch.long), rewards=torch.tensor([1.0, 0, 1, 0]))
    w = _weights(b)
    assert (w.abs() < 1).all() and (w[ids == 2] > 0).all() and (w[ids != 2] == 0).all()
    torch.testing.assert_close(w, loop_ktae_weights(b))


def test_ktae_rejects_bad_weights():
    with pytest.raises(ValueError, match="alpha"):
        get_estimator("ktae")(ragged(1), alpha=0.0, beta=0.0)
    with pytest.raises(ValueError, match="top"):
        get_estimator("ktae")(ragged(1), top=0.0)


# ---------------------------------------------------------------------------------------------- UCAS
def _ucas1(a, z, ln, **kw):
    return float(ucas_token_advantage(torch.tensor([a]), torch.tensor([z]), torch.tensor([[ln]]),
                                      torch.tensor([[True]]), **kw)[0, 0])


def test_ucas_hand_cases():
    assert _ucas1(1.0, 0.0, 0.5) == pytest.approx(0.975)
    assert _ucas1(-1.0, 1.0, 1.0) == pytest.approx(-math.exp(0.35) - 0.05)
    assert _ucas1(-1.0, 1.0, 1.0) == pytest.approx(-1.4691, abs=1e-4)
    assert 0.01 * math.exp(-0.5) - 0.05 < 0 and _ucas1(0.01, 2.0, 1.0) == 0.0  # clamped
    assert _ucas1(0.0, 1.0, 1.0) == pytest.approx(-0.05)  # zero-signal rows are penalised (reference) ...
    assert _ucas1(0.0, 1.0, 1.0, penalize_zero_signal=False) == 0.0  # ... unless switched off


def test_ucas_reduces_to_grpo_without_shaping():
    for seed in range(30):
        b = ragged(seed)
        got = get_estimator("ucas")(b, beta_pos=0.0, beta_neg=0.0, lam=0.0).advantages
        assert torch.equal(got, get_estimator("grpo")(b).advantages)


def test_ucas_end_to_end_small_case():
    # one group R=[1,0]: a=[+-0.7071]; C=[3,1] -> zhat=[+-0.7071]; logits 0..3 -> l~ = [0, 1/3 | 2/3, 1]
    b = make([1, 0], [2, 2], certainty=torch.tensor([[1.0, 2.0], [0.5, 0.5]]),
             token_logits=torch.tensor([[0.0, 1.0], [2.0, 3.0]]))
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    z = 1 / (math.sqrt(2.0) + 1e-6)
    want = [[a * math.exp(-0.25 * z) - 0.05 * 0, a * math.exp(-0.25 * z) - 0.05 / 3],
            [-a * math.exp(0.35 * -z) - 0.05 * 2 / 3, -a * math.exp(0.35 * -z) - 0.05]]
    torch.testing.assert_close(get_estimator("ucas")(b).advantages.double(),
                               torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=1e-6)


def test_ucas_constant_logits_use_half():
    b = make([1, 0], [2, 2], certainty=torch.ones(2, 2), token_logits=torch.full((2, 2), 4.0))
    adv = get_estimator("ucas")(b, lam=0.1).advantages
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert adv[0].tolist() == pytest.approx([a - 0.05, a - 0.05]) and adv[1].tolist() == pytest.approx([-a - 0.05] * 2)
