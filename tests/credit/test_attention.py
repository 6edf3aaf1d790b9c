"""Attention preplan/anchor credit (methods.md §5.2, paper arXiv 2510.13554 eq. 14-19): attn_local, attn_global,
attn_coupled.

Hand cases computed from the paper's formulas, slow loop references over random ragged batches, and the invariants
methods.md lists (gamma_amp = 1 is GRPO, negative advantages untouched under sign="nonnegative", exactly
round(q L) tokens selected with distinct positive scores, coupled with alpha = 0 and no dominated anchor = global).
"""

import math

import pytest
import torch

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.attention import top_q_mask, waad_delta
from creditlab.credit.loops import LOOPS
from creditlab.sample import random_batch

A = 1 / math.sqrt(2)  # GRPO advantage of rewards [1, 0]: (1 - .5) / std_unbiased([1, 0]) = .5 / .7071


def make(waad, fai, rewards=(1.0, 0.0), punct=None):
    """Rows with the same WAAD/FAI rows and rewards `rewards` in one group."""
    B, T = len(rewards), len(waad)
    mask = torch.ones(B, T, dtype=torch.bool)
    return RolloutBatch(
        response_ids=torch.ones(B, T, dtype=torch.long), response_mask=mask, group_ids=torch.zeros(B, dtype=torch.long),
        rewards=torch.tensor(rewards), attn_waad=torch.tensor([waad] * B, dtype=torch.float32),
        attn_fai=torch.tensor([fai] * B, dtype=torch.float32),
        punct_mask=torch.tensor([punct or [False] * T] * B)).validate()


WAAD = [1.0, 5.0, 2.0, 2.0, 6.0, 0.5]  # Delta = |1-5|, |5-2|, |2-2|, |2-6|, |6-.5|, last 0 = [4, 3, 0, 4, 5.5, 0]
FAI = [0.1, 0.5, 0.2, 0.4, 0.3, 0.0]  # last token: empty horizon -> 0, never selected


def test_delta_marks_the_token_before_the_jump():
    b = make(WAAD, FAI)
    torch.testing.assert_close(waad_delta(b.attn_waad, b.response_mask)[0],
                               torch.tensor([4, 3, 0, 4, 5.5, 0], dtype=torch.float64))


def test_local_hand_case():
    # q = .4, L = 6 -> k = floor(2.4 + .5) = 2: Delta 5.5 (t=4), then the tie 4 at t=0 and t=3 -> earlier t=0
    adv = get_estimator("attn_local")(make(WAAD, FAI)).advantages
    g = [1.5, 1, 1, 1, 1.5, 1]
    torch.testing.assert_close(adv[0], torch.tensor([A * x for x in g]))
    torch.testing.assert_close(adv[1], torch.tensor([-A * x for x in g]))  # sign="both" (ICML text)
    neg_only = get_estimator("attn_local")(make(WAAD, FAI), sign="nonnegative").advantages
    torch.testing.assert_close(neg_only[1], torch.full((6,), -A))  # v1 text: negative A untouched


def test_global_hand_case():
    # top 2 FAI: .5 (t=1), .4 (t=3)
    adv = get_estimator("attn_global")(make(WAAD, FAI), gamma_amp=2.0).advantages
    torch.testing.assert_close(adv[0], torch.tensor([A, 2 * A, A, 2 * A, A, A]))


def test_coupled_hand_case():
    # q = .5 -> T_glob = {1 (.5), 3 (.4), 4 (.3)}. tau_waad = 2, tau_delta = 3.5, k = 3:
    #   t=1: WAAD 5 > 2 -> not dominated;  t=4: WAAD 6 > 2 -> not dominated;
    #   t=3: WAAD 2 <= 2, window t=0..2 Delta [4, 3, 0], max 4 >= 3.5 -> dominated, intro = t=0 (argmax).
    # gamma = 1 + .5 [1(T_glob \ D) + .5 1(D) + .5 1(I(D))] = [1.25, 1.5, 1, 1.25, 1.5, 1]
    credit = get_estimator("attn_coupled")(make(WAAD, FAI), q=0.5, k=3, alpha=0.5, tau_waad=2.0, tau_delta=3.5)
    torch.testing.assert_close(credit.advantages[0], torch.tensor([A * x for x in [1.25, 1.5, 1, 1.25, 1.5, 1]]))
    assert credit.metrics["credit/attn_dominated_frac"] == pytest.approx(1 / 3)
    # k = 2: window of t=3 is t=1..2, Delta [3, 0] < 3.5 -> nothing dominated -> global-anchor credit
    torch.testing.assert_close(
        get_estimator("attn_coupled")(make(WAAD, FAI), q=0.5, k=2, tau_waad=2.0, tau_delta=3.5).advantages,
        get_estimator("attn_global")(make(WAAD, FAI), q=0.5).advantages)


def test_punctuation_share_is_logged():
    m = get_estimator("attn_global")(make(WAAD, FAI, punct=[False, True, False, False, False, True])).metrics
    assert m["credit/attn_selected_punct_frac"] == pytest.approx(0.5)  # selected {1, 3}, 1 is punctuation
    assert m["credit/attn_punct_frac"] == pytest.approx(2 / 6)
    assert m["credit/attn_selected_frac"] == pytest.approx(2 / 6)


def ragged(seed):
    return random_batch(n_groups=1 + seed % 5, max_group=6, T=1 + seed % 13, seed=seed, binary_rewards=seed % 3 != 0,
                        empty_row_prob=0.2)


CASES = [
    ("attn_local", {}), ("attn_local", {"sign": "nonnegative", "q": 0.7, "gamma_amp": 2.0}),
    ("attn_global", {}), ("attn_global", {"q": 0.2, "scale_by_std": False, "singleton": "raw"}),
    ("attn_coupled", {}), ("attn_coupled", {"k": 1, "alpha": 0.0}),
    ("attn_coupled", {"k": 3, "alpha": 1.0, "tau_waad": 2.0, "tau_delta": 0.5, "sign": "nonnegative"}),
]


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_loop_reference(name, kw):
    dominated = 0.0
    for seed in range(50):
        b = ragged(seed)
        credit = get_estimator(name)(b, **kw)
        torch.testing.assert_close(credit.advantages.double(), LOOPS[name](b, **kw), atol=1e-5, rtol=1e-5)
        dominated += credit.metrics.get("credit/attn_dominated_frac", 0.0)
    if name == "attn_coupled" and kw.get("alpha", 0.5) > 0:
        assert dominated > 0  # the random batches do exercise the back-allocation branch


@pytest.mark.parametrize("name", ["attn_local", "attn_global", "attn_coupled"])
def test_gamma_one_is_grpo(name):
    for seed in range(20):
        b = ragged(seed)
        torch.testing.assert_close(get_estimator(name)(b, gamma_amp=1.0).advantages,
                                   get_estimator("grpo")(b).advantages)


@pytest.mark.parametrize("name", ["attn_local", "attn_global", "attn_coupled"])
def test_nonnegative_sign_never_changes_negative_advantages(name):
    for seed in range(20):
        b = ragged(seed)
        base = get_estimator("grpo")(b).advantages
        adv = get_estimator(name)(b, sign="nonnegative").advantages
        assert torch.equal(adv[base < 0], base[base < 0])
        assert ((adv >= base) | (base < 0)).all() and (torch.sign(adv) == torch.sign(base)).all()


def test_top_q_selects_round_q_l_tokens_with_distinct_positive_scores():
    g = torch.Generator().manual_seed(0)
    for L in range(1, 30):
        score = torch.rand(1, L, generator=g) + 0.01
        for q in (0.1, 0.4, 0.75, 1.0):
            sel = top_q_mask(score, torch.ones(1, L, dtype=torch.bool), q)
            assert int(sel.sum()) == math.floor(q * L + 0.5)
            if sel.any():
                assert score[sel].min() >= score[~sel].max() if (~sel).any() else True


def test_coupled_alpha_zero_without_dominated_anchors_is_global():
    for seed in range(20):
        b = ragged(seed)
        # a tau_delta above every Delta: no anchor is ever dominated
        torch.testing.assert_close(get_estimator("attn_coupled")(b, alpha=0.0, tau_delta=1e30).advantages,
                                   get_estimator("attn_global")(b).advantages)


@pytest.mark.parametrize("name,kw,needle", [
    ("attn_local", {"q": 0.0}, "q"), ("attn_global", {"gamma_amp": 0.0}, "gamma_amp"),
    ("attn_coupled", {"k": 0}, "k"), ("attn_coupled", {"alpha": 1.5}, "alpha"), ("attn_local", {"sign": "pos"}, "sign"),
])
def test_bad_hyperparameters_name_the_parameter(name, kw, needle):
    with pytest.raises(ValueError, match=needle):
        get_estimator(name)(ragged(1), **kw)


def test_missing_signal_names_its_producer():
    b = ragged(2).replace(attn_fai=None)
    with pytest.raises(ValueError, match=r"attn_fai.*creditlab\.signals\.attention"):
        get_estimator("attn_global")(b)


def with_holes(b, seed):
    """Masked-out tokens inside responses (multi-turn observation tokens): the valid tokens are not a prefix."""
    keep = torch.rand(b.response_mask.shape, generator=torch.Generator().manual_seed(seed)) > 0.25
    mask = b.response_mask & keep
    minus_one = {f: torch.where(mask, getattr(b, f), -1) for f in ("step_ids", "turn_ids", "tree_node")
                 if getattr(b, f) is not None}  # fields that hold -1 outside the mask
    return b.replace(response_mask=mask, **minus_one).validate()


@pytest.mark.parametrize("name,kw", CASES)
def test_matches_loop_reference_with_holes_in_the_mask(name, kw):
    for seed in range(30):
        b = with_holes(ragged(seed), seed)
        torch.testing.assert_close(get_estimator(name)(b, **kw).advantages.double(), LOOPS[name](b, **kw),
                                   atol=1e-5, rtol=1e-5)
