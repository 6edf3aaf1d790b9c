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
    ("ktae", {"zero_last_token": False}), ("ktae", {"reference_float32": True, "gamma_tf": 0.0}),
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
    # TRL port `_topk_threshold`: tau = sorted(H)[int((1 - 0.3) * 5)] = sorted(H)[3] = 3 -> only token 4 (H > 3)
    # gets x(1+alpha); row1 (negative) untouched. (The interpolated 0.7-quantile, 2.8, would also boost token 3.)
    ent = torch.tensor([[0.0, 1, 2, 3, 4], [9, 0, 0, 0, 0]])
    b = make([1, 0], [5, 1], entropies=ent)
    adv = get_estimator("hicra_entropy")(b).advantages
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(adv[0].double(), torch.tensor([a, a, a, a, 1.2 * a], dtype=torch.float64),
                               atol=1e-6, rtol=1e-6)
    assert adv[1, 0] == pytest.approx(-a) and (adv[1, 1:] == 0).all()
    gated = get_estimator("hicra_entropy")(make([1, 0], [5, 9], T=9, entropies=torch.rand(2, 9))).advantages
    assert torch.equal(gated, get_estimator("grpo")(make([1, 0], [5, 9], T=9)).advantages)  # row0 not long


def test_hicra_entropy_threshold_is_the_ports_index_not_a_quantile():
    # issue 11's hand case: 10 distinct entropies 0..9, k = 0.3. The port takes tau = sorted(H)[int(0.7 * 10)]
    # = sorted(H)[7] = 7 (Python: int((1 - 0.3) * 10) = int(7.000000000000001) = 7), so H in {8, 9} is boosted:
    # 2 of 10 tokens. torch.quantile(H, 0.7) = 6.3 would boost 3 (7, 8, 9).
    ent = torch.tensor([[3.0, 9, 0, 7, 1, 8, 2, 6, 4, 5], [0.0] * 10])
    b = make([1, 0], [10, 1], T=10, entropies=ent)
    c = get_estimator("hicra_entropy")(b)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    boosted = (c.advantages[0].double() - a).abs() > 1e-6
    assert boosted.tolist() == [False, True, False, False, False, True, False, False, False, False]
    assert c.advantages[0, 1].item() == pytest.approx(1.2 * a)
    # k = 1: index int(0) = 0, tau = min -> every token but the smallest; one valid token: tau = that token -> none
    c = get_estimator("hicra_entropy")(b, top_frac=1.0)
    assert int(((c.advantages[0].double() - a).abs() > 1e-6).sum()) == 9
    one = make([1, 0], [3, 1], T=3, entropies=torch.tensor([[0.5, 0.5, 0.5], [0.0, 0, 0]]))
    assert torch.equal(get_estimator("hicra_entropy")(one).advantages, get_estimator("grpo")(one).advantages)


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
    """The weight formula alone: the EOS rule (zero_last_token) is tested on its own below."""
    return ktae_token_weights(b, **{"zero_last_token": False, **kw})


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
    torch.testing.assert_close(w, loop_ktae_weights(b, zero_last_token=False))


def test_ktae_eos_gets_zero_weight_by_default():
    # The reference hard-codes w(151643) = 0 (Qwen's <|endoftext|>). Two correct rows stop with EOS (id 151643),
    # the wrong rows are cut at the length limit (no EOS): EOS sits on the correct side only, so without the rule
    # it would get a large positive w. Default: every row's final valid token gets 0 -- the EOS of rows that
    # stopped, and the last real token (id 9) of the truncated rows (the one documented difference).
    eos = 151643
    ids = torch.tensor([[4, 5, eos, 0], [5, 4, 4, eos], [4, 6, 6, 9], [6, 6, 4, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    b = RolloutBatch(response_ids=ids, response_mask=mask, group_ids=torch.zeros(4, dtype=torch.long),
                     rewards=torch.tensor([1.0, 1, 0, 0]))
    full = ktae_token_weights(b, zero_last_token=False)
    assert full[0, 2] > 0.5 and full[1, 3] > 0.5  # EOS only in correct rows: strongly "key" without the rule
    w = ktae_token_weights(b)
    last = torch.tensor([[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    assert (w[last] == 0).all()
    assert torch.equal(w[mask & ~last], full[mask & ~last])  # every other weight is unchanged
    torch.testing.assert_close(w, loop_ktae_weights(b))
    adv = get_estimator("ktae")(b).advantages  # a = +-0.866 (GRPO), EOS positions carry a alone
    assert adv[0, 2].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-6), rel=1e-5)


def _reference_fisher_float32(appear):
    """Transcription of xiaolizh1/KTAE compute_key_tokens.fisher_exact_test: one group's [V+1, 4] float32 table
    (a, b, c, d per token id, all-zero rows for ids absent from the group), evaluated on one shared grid."""
    a, b, c, d = torch.unbind(appear, dim=1)
    r1, r2, c1 = a + b, c + d, a + c
    n = r1 + r2
    k_min = torch.max(torch.tensor(0, dtype=torch.float32), r1 + c1 - n)
    k_max = torch.min(r1, c1)
    k = torch.tile(torch.arange(torch.max(k_max) + 1, dtype=torch.float32), (appear.size(0), 1))
    on = (k >= k_min.unsqueeze(1)) & (k <= k_max.unsqueeze(1))

    def log_comb(nn, kk):
        return torch.lgamma(nn + 1) - torch.lgamma(kk + 1) - torch.lgamma(nn - kk + 1)

    grid = lambda x: x.unsqueeze(1).expand_as(k)  # noqa: E731
    p_k = torch.exp(log_comb(grid(c1), k) + log_comb(grid(n) - grid(c1), grid(r1) - k)
                    - log_comb(grid(n), grid(r1))) * on.float()
    p_obs = torch.exp(log_comb(c1, a) + log_comb(n - c1, r1 - a) - log_comb(n, r1))
    return torch.sum(torch.where((p_k <= p_obs.unsqueeze(1)) & on, p_k, 0.), dim=1)


def test_ktae_reference_float32_fisher_is_bit_identical_to_the_reference():
    from creditlab.credit.planning import fisher_p_reference_float32

    gen = torch.Generator().manual_seed(0)
    for trial in range(4):
        # the reference's table has one row per id up to the largest id (Qwen: 151643) once; smaller tables after
        vocab = 151644 if trial == 0 else 4096
        n_c, n_w = 2 + trial, 3 + 2 * trial
        pres = torch.stack([torch.randint(0, n_c + 1, (40,), generator=gen),
                            torch.randint(0, n_w + 1, (40,), generator=gen)], 1).float()
        pres = pres[(pres.sum(1) > 0)]  # tokens that occur in the group
        ids = torch.randperm(vocab, generator=gen)[: pres.shape[0]]
        appear = torch.zeros(vocab, 4)
        appear[ids] = torch.stack([pres[:, 0], pres[:, 1], n_c - pres[:, 0], n_w - pres[:, 1]], 1)
        want = _reference_fisher_float32(appear)[ids]
        width = int(torch.minimum(pres.sum(1), torch.tensor(float(n_c))).max()) + 1
        got = fisher_p_reference_float32(pres[:, 0].double(), pres[:, 1].double(), torch.full((len(ids),), n_c),
                                         torch.full((len(ids),), n_w), torch.full((len(ids),), width))
        assert torch.equal(got, want), trial
    # a p = 1 table whose float32 sum is not exactly 1: F = exp(-2p) = 0.1353 instead of 0 (issue 11, item 6)
    one = fisher_p_reference_float32(*(torch.tensor([x], dtype=torch.float64) for x in (0, 1, 1, 2)),
                                     torch.tensor([2]))
    assert fisher_exact_two_sided(*(torch.tensor([x], dtype=torch.float64) for x in (0, 1, 1, 2)))[1].item()
    assert one.item() != 1.0 and math.exp(-2 * one.item()) == pytest.approx(0.135335, abs=1e-6)


def test_ktae_reference_float32_end_to_end():
    for seed in range(20):
        b = ragged(seed)
        got = ktae_token_weights(b, reference_float32=True)
        torch.testing.assert_close(got, loop_ktae_weights(b, reference_float32=True), atol=1e-6, rtol=1e-6)
    # token 1 is in the correct row and one of the two wrong rows: table (a, b, n_c, n_w) = (1, 1, 1, 2), p = 1.
    # float64: F = 0; the reference's float32 sum is 1 - 6e-8, so F = exp(-2p) = 0.1353 enters z and changes w.
    ids = torch.tensor([[1, 5, 5], [1, 6, 6], [7, 7, 7]])
    b = RolloutBatch(response_ids=ids, response_mask=torch.ones(3, 3, dtype=torch.bool),
                     group_ids=torch.zeros(3, dtype=torch.long), rewards=torch.tensor([1.0, 0, 0]))
    exact = ktae_token_weights(b, zero_last_token=False)
    ref32 = ktae_token_weights(b, zero_last_token=False, reference_float32=True)
    h = math.asin(1.0) - math.asin(math.sqrt(0.5))  # a/n_c = 1, b/n_w = 1/2
    ig = (-(1 / 3) * math.log2(1 / 3) - (2 / 3) * math.log2(2 / 3)) - 2 / 3  # H(Y) - H(Y|token), bits
    # tf terms: token 1 occurs once among 3 correct tokens and once among 6 wrong tokens (BM25, k1 = 2, b = .5)
    avg = (3 + 6) / 2
    tf_c = (1 / 3) * 3 / (1 / 3 + 2 * (0.5 + 0.5 * 3 / avg))
    tf_w = (1 / 6) * 3 / (1 / 6 + 2 * (0.5 + 0.5 * 6 / avg))
    x = h + tf_c / (tf_w + 1e-5) - tf_w / (tf_c + 1e-5)
    for w, fisher in ((exact, 0.0), (ref32, math.exp(-2 * 0.9999999403953552))):
        z = (fisher + ig) * x / 2
        assert w[0, 0].item() == pytest.approx(2 * (1 / (1 + math.exp(-z)) - 0.5), abs=1e-6)


def test_ktae_memory_is_linear_in_the_batch():
    # 3000 rows in one group plus 2000 singletons: the old dense (group, a, b) bucket needed
    # groups x (max group + 1)^2 = 2001 x 3001^2 bools (18 GB); the distinct-table sort needs O(tokens).
    gen = torch.Generator().manual_seed(0)
    B, T = 5000, 3
    group_ids = torch.cat([torch.zeros(3000, dtype=torch.long), torch.arange(1, 2001)])
    b = RolloutBatch(response_ids=torch.randint(0, 30, (B, T), generator=gen),
                     response_mask=torch.ones(B, T, dtype=torch.bool), group_ids=group_ids,
                     rewards=torch.randint(0, 2, (B,), generator=gen).float())
    adv = get_estimator("ktae")(b).advantages
    assert torch.isfinite(adv).all() and (adv[3000:] == 0).all()  # singletons: a = 0, w = 0


def test_ktae_token_ids_of_any_size_are_fine():
    # ids are re-indexed densely: 2^31 - 1 and 0 work like 1 and 0 (no product overflow in the sort key)
    b = random_batch(n_groups=3, max_group=5, T=6, seed=4, vocab=3)
    big = b.replace(response_ids=torch.where(b.response_ids == 1, 2**31 - 1, b.response_ids))
    torch.testing.assert_close(get_estimator("ktae")(big).advantages, get_estimator("ktae")(b).advantages)


def test_ktae_rejects_bad_weights():
    with pytest.raises(ValueError, match="alpha"):
        get_estimator("ktae")(ragged(1), alpha=0.0, beta=0.0)
    with pytest.raises(ValueError, match="top"):
        get_estimator("ktae")(ragged(1), top=0.0)
    with pytest.raises(ValueError, match="ignore_token_ids"):
        get_estimator("ktae")(ragged(1), ignore_token_ids=(-1,))


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
