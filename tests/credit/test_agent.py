"""Agent estimators (methods.md §6): gigpo, igpo, mt_grpo, oprl_turn. Hand cases, loop references, properties."""

import pytest
import torch

from creditlab import RolloutBatch, get_estimator
from creditlab.credit.loops import LOOPS
from creditlab.registry import get_spec
from creditlab.sample import random_batch


def episodes(turn_lengths, *, rewards=None, turn_rewards=None, anchors=None, probs=None, group_ids=None,
             obs_gap=1):
    """Multi-turn rows: turn k of row b has turn_lengths[b][k] action tokens; `obs_gap` observation tokens (outside
    the mask) separate consecutive turns, as the multi-turn rollout lays them out."""
    B = len(turn_lengths)
    rows = []
    for lens in turn_lengths:
        ids, m = [], []
        for k, n in enumerate(lens):
            if k:
                ids += [-1] * obs_gap
                m += [False] * obs_gap
            ids += [k] * n
            m += [True] * n
        rows.append((ids, m))
    T = max(len(r[0]) for r in rows)
    N = max(len(lens) for lens in turn_lengths)
    turn_ids = torch.full((B, T), -1)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (ids, m) in enumerate(rows):
        turn_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(m)] = torch.tensor(m)

    def pad(x, dtype):
        out = torch.zeros(B, N, dtype=dtype)
        for b, vals in enumerate(x or []):
            out[b, : len(vals)] = torch.tensor(vals, dtype=dtype)
        return out if x is not None else None

    tr = pad(turn_rewards, torch.float32)
    R = torch.tensor(rewards, dtype=torch.float32) if rewards is not None else (tr.sum(1) if tr is not None
                                                                                 else torch.zeros(B))
    return RolloutBatch(response_ids=torch.where(mask, 5, 0), response_mask=mask,
                        group_ids=torch.tensor(group_ids or [0] * B), rewards=R, turn_ids=turn_ids,
                        turn_rewards=tr, anchor_states=pad(anchors, torch.long),
                        answer_probs=pad(probs, torch.float32)).validate()


def per_turn(credit, batch):
    """{(row, turn): advantage} read back from the tokens (checks the value is constant within a turn)."""
    out = {}
    for b in range(batch.B):
        for t in range(batch.T):
            if batch.response_mask[b, t]:
                key = (b, int(batch.turn_ids[b, t]))
                v = float(credit.advantages[b, t])
                assert out.setdefault(key, v) == pytest.approx(v)
    return out


# ------------------------------------------------------------------ GiGPO
def test_gigpo_hand_case_from_methods():
    # methods.md §6.1: tau1 = [0, 1], tau2 = [0, 0], both first steps at anchor X, second steps distinct.
    # A^E = +-.5; returns tau1 = [.95, 1], tau2 = [0, 0]; anchor-X group {.95, 0} -> +-.475; others singletons.
    b = episodes([[2, 3], [1, 2]], turn_rewards=[[0, 1], [0, 0]], anchors=[[7, 8], [7, 9]])
    adv = per_turn(get_estimator("gigpo")(b), b)
    assert adv == pytest.approx({(0, 0): 0.975, (0, 1): 0.5, (1, 0): -0.975, (1, 1): -0.5})
    assert (get_estimator("gigpo")(b).advantages[~b.response_mask] == 0).all()


def test_gigpo_mean_std_norm_and_step_coef():
    b = episodes([[2, 3], [1, 2]], turn_rewards=[[0, 1], [0, 0]], anchors=[[7, 8], [7, 9]])
    c = get_estimator("gigpo")(b, mode="mean_std_norm", step_coef=0.5)
    # episode: (1 - .5) / (std .7071 + 1e-6) = .7071; step: (.95 - .475) / (.6718 + 1e-6) = .7071, times .5
    assert per_turn(c, b)[(0, 0)] == pytest.approx(0.7071 + 0.5 * 0.7071, abs=1e-4)
    assert per_turn(c, b)[(1, 1)] == pytest.approx(-0.7071, abs=1e-4)
    assert c.metrics["credit/step_group_hit_rate"] == pytest.approx(0.5)


def test_gigpo_groups_repeated_states_inside_one_episode_and_separates_prompt_groups():
    # row 0 visits state 7 twice (a wall bump): both of its turns join the anchor-7 group with row 1's first turn.
    b = episodes([[1, 1], [1], [1]], turn_rewards=[[0, 1], [0.5], [0.2]], anchors=[[7, 7], [7], [7]],
                 group_ids=[0, 0, 1])
    a = per_turn(get_estimator("gigpo")(b, gamma=1.0), b)
    # group 0: episode R = [1, .5] -> A^E = [.25, -.25]; anchor-7 returns {1, 1, .5} mean .8333
    assert a[(0, 0)] == pytest.approx(0.25 + 1 - 0.8333, abs=1e-4)
    assert a[(1, 0)] == pytest.approx(-0.25 + 0.5 - 0.8333, abs=1e-4)
    assert a[(2, 0)] == 0.0  # alone in its prompt group: singleton episode and step group


def test_gigpo_episode_baseline_steps_weights_long_trajectories():
    # reference default (cross steps): R = [1 (3 turns), 0 (1 turn)] -> mean over 4 step rows = .75
    b = episodes([[1, 1, 1], [1]], turn_rewards=[[0, 0, 1], [0]], anchors=[[1, 2, 3], [4]])
    steps = per_turn(get_estimator("gigpo")(b, episode_baseline="steps", step_coef=0.0), b)
    traj = per_turn(get_estimator("gigpo")(b, step_coef=0.0), b)
    assert steps[(0, 0)] == pytest.approx(0.25) and steps[(1, 0)] == pytest.approx(-0.75)
    assert traj[(0, 0)] == pytest.approx(0.5) and traj[(1, 0)] == pytest.approx(-0.5)


def test_gigpo_singleton_episode_group_policy():
    b = episodes([[2]], turn_rewards=[[0.7]], anchors=[[1]])
    assert per_turn(get_estimator("gigpo")(b), b)[(0, 0)] == 0.0
    assert per_turn(get_estimator("gigpo")(b, singleton="raw"), b)[(0, 0)] == pytest.approx(0.7)


# ------------------------------------------------------------------ IGPO
def test_igpo_hand_case_from_methods_and_telescoping():
    # methods.md §6.3: P = [.1, .3, .2], final F1 = 1 -> r = [.2, -.1, 1]; gamma = 1 turn returns [1.1, .9, 1]
    b = episodes([[2, 1, 3]], probs=[[0.1, 0.3, 0.2]], rewards=[1.0])
    assert per_turn(get_estimator("igpo")(b, norm="none"), b) == pytest.approx(
        {(0, 0): 1.1, (0, 1): 0.9, (0, 2): 1.0})
    # telescoping: the information gains of the non-final turns sum to P_{T-1} - P_0 = .1
    c = get_estimator("igpo")(b, norm="none")
    assert per_turn(c, b)[(0, 0)] - 1.0 == pytest.approx(0.2 - 0.1)


def test_igpo_group_normalisation_pools_every_turn_of_the_group():
    # rows: P = [.1, .3] R = 1 -> r = [.2, 1];  P = [.5] R = 0 -> r = [0]. Pool {.2, 1, 0}: mean .4, std .5292
    b = episodes([[1, 1], [2]], probs=[[0.1, 0.3], [0.5]], rewards=[1.0, 0.0])
    a = per_turn(get_estimator("igpo")(b), b)
    z = [(0.2 - 0.4) / 0.52915, (1 - 0.4) / 0.52915, (0 - 0.4) / 0.52915]
    assert a[(0, 0)] == pytest.approx(z[0] + z[1], abs=1e-4) and a[(0, 1)] == pytest.approx(z[1], abs=1e-4)
    assert a[(1, 0)] == pytest.approx(z[2], abs=1e-4)
    g = per_turn(get_estimator("igpo")(b, gamma=0.5), b)
    assert g[(0, 0)] == pytest.approx(z[0] + 0.5 * z[1], abs=1e-4)


# ------------------------------------------------------------------ MT-GRPO
def _z(xs):
    m = sum(xs) / len(xs)
    s = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return [(x - m) / (s + 1e-6) for x in xs]


def test_mt_grpo_is_the_reference_aae_on_two_turn_rows():
    # reference (mt_grpo_env_trainer.py, "aae"): turn-1 tokens A^O + lambda A^T, turn-2 tokens A^O
    turn, outcome = [1.0, 0.0, 1.0, 0.5], [1.0, 1.0, 0.0, 0.0]
    b = episodes([[2, 2]] * 4, turn_rewards=[[t, o] for t, o in zip(turn, outcome)])
    a = per_turn(get_estimator("mt_grpo")(b, turn_coef=0.7), b)
    at, ao = _z(turn), _z(outcome)
    for i in range(4):
        assert a[(i, 0)] == pytest.approx(ao[i] + 0.7 * at[i], abs=1e-5)
        assert a[(i, 1)] == pytest.approx(ao[i], abs=1e-5)


def test_mt_grpo_turn_index_baseline_is_biased_when_the_policy_stops():
    """verl#7244: equal-return episodes of different lengths get different advantages under per-turn-index
    normalisation, so the gradient of the stop/continue decision is not zero although stopping changes nothing.

    Decision at turn 0: stop (one turn, reward 1) or continue (turn rewards [.3, .7], also 1 in total)."""
    stop, go = [1.0], [0.3, 0.7]
    b = episodes([[1], [1, 1], [1], [1, 1]], turn_rewards=[stop, go, stop, go])
    biased = per_turn(get_estimator("mt_grpo")(b, scale_by_std=False), b)
    # turn 0 pool {1, .3, 1, .3}: mean .65 -> stop +.35, continue -.35 (+ turn 1's 0): the hidden bonus for
    # stopping equals the group mean of the extra turn's reward (.7), split around the mean: .35 - (-.35)
    assert biased[(0, 0)] == pytest.approx(0.35) and biased[(1, 0)] == pytest.approx(-0.35)
    # score-function gradient of the stop logit under a fair coin: sum_i A_i (1[stop_i] - .5)
    # = 4 rows x .35 x .5 = .7 != 0: the update pushes towards stopping although both choices return 1
    grad = sum(biased[(i, 0)] * ((1 if i % 2 == 0 else 0) - 0.5) for i in range(4))
    assert grad == pytest.approx(0.7)
    fixed = per_turn(get_estimator("mt_grpo")(b, baseline="return_to_go", scale_by_std=False), b)
    assert all(abs(v) < 1e-9 for v in fixed.values())  # equal returns -> no preference, unbiased


def test_mt_grpo_return_to_go_normalises_per_turn_index():
    b = episodes([[1, 1], [1, 1], [1]], turn_rewards=[[0, 1], [0.5, 0], [0.2]])
    a = per_turn(get_estimator("mt_grpo")(b, baseline="return_to_go"), b)
    z0 = _z([1.0, 0.5, 0.2])
    assert [a[(i, 0)] for i in range(3)] == pytest.approx(z0, abs=1e-5)
    assert [a[(0, 1)], a[(1, 1)]] == pytest.approx(_z([1.0, 0.0]), abs=1e-5)


# ------------------------------------------------------------------ turn-level OPRL
def test_oprl_turn_is_oprl_with_turns_as_steps():
    b = random_batch(n_groups=3, max_group=4, T=9, seed=4)
    got = get_estimator("oprl_turn")(b).advantages
    want = get_estimator("oprl")(b.replace(step_ids=b.turn_ids)).advantages
    assert torch.equal(got, want)
    assert set(get_spec("oprl_turn").needs) == {n if n != "step_ids" else "turn_ids" for n in get_spec("oprl").needs}
    assert get_spec("oprl_turn").defaults == get_spec("oprl").defaults
    assert {n: str(p.interval) for n, p in get_spec("oprl_turn").params.items()} == \
        {n: str(p.interval) for n, p in get_spec("oprl").params.items()}


def test_oprl_turn_with_prm_equal_to_reference_is_episode_rloo():
    b = random_batch(n_groups=3, max_group=4, T=9, seed=5)
    b = b.replace(prm_logprobs=b.logprobs, ref_logprobs=b.logprobs, step_ids=None)  # q = 0 whatever the denominator
    assert torch.allclose(get_estimator("oprl_turn")(b).advantages, get_estimator("rloo")(b).advantages, atol=1e-6)


# ------------------------------------------------------------------ loop references and validation
CASES = {
    "gigpo": [{}, {"mode": "mean_std_norm"}, {"episode_baseline": "steps", "singleton": "raw"}, {"gamma": 0.5}],
    "igpo": [{}, {"norm": "turn_index", "gamma": 0.9}, {"norm": "none"}, {"singleton": "raw", "outcome_coef": 2.0}],
    "mt_grpo": [{}, {"baseline": "return_to_go"}, {"turn_coef": 0.5, "gamma": 0.8, "scale_by_std": False,
                                                   "singleton": "raw"}],
    "oprl_turn": [{}, {"step_coef": 0.5}],
}


@pytest.mark.parametrize("name,kw", [(n, kw) for n, kws in CASES.items() for kw in kws])
def test_matches_loop_reference_on_ragged_batches(name, kw):
    for seed in range(25):
        b = random_batch(n_groups=1 + seed % 4, max_group=5, T=1 + seed % 9, seed=seed,
                         binary_rewards=seed % 2 == 0, empty_row_prob=0.2)
        got = get_estimator(name)(b, **kw).advantages.double()
        torch.testing.assert_close(got, LOOPS[name](b, **kw), atol=1e-5, rtol=1e-5)


def test_loop_reference_with_observation_gaps():
    b = episodes([[2, 1, 2], [1, 3], [2]], turn_rewards=[[0, 0.5, 1], [0.1, 0], [0.3]],
                 anchors=[[1, 2, 1], [1, 2], [1]], probs=[[0.1, 0.2, 0.4], [0.3, 0.1], [0.5]], obs_gap=3)
    for name in ("gigpo", "igpo", "mt_grpo"):
        torch.testing.assert_close(get_estimator(name)(b).advantages.double(), LOOPS[name](b), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name,kw,msg", [
    ("gigpo", {"gamma": 1.5}, "gamma"), ("gigpo", {"mode": "zscore"}, "mode"), ("igpo", {"norm": "x"}, "norm"),
    ("mt_grpo", {"baseline": "x"}, "baseline"), ("igpo", {"singleton": "x"}, "singleton"),
])
def test_rejects_bad_hyperparameters(name, kw, msg):
    with pytest.raises(ValueError, match=msg):
        get_estimator(name)(random_batch(seed=0), **kw)


def test_missing_turn_fields_name_their_producer():
    b = random_batch(seed=0).replace(anchor_states=None)
    with pytest.raises(ValueError, match=r"anchor_states.*multi-turn rollout"):
        get_estimator("gigpo")(b)
    with pytest.raises(ValueError, match=r"answer_probs.*info_gain"):
        get_estimator("igpo")(random_batch(seed=0).replace(answer_probs=None))


def test_one_turn_episodes_reduce_to_grpo():
    """A single-turn response is a one-turn episode (signals.turns.single_turn_fields): igpo and mt_grpo give GRPO,
    gigpo (mean_norm, one anchor per prompt) gives twice the centred reward (episode term + identical step term)."""
    from creditlab.signals.turns import single_turn_fields

    b = random_batch(n_groups=4, max_group=5, T=6, seed=9, binary_rewards=False, empty_row_prob=0.0)
    b = b.replace(turn_ids=None, turn_rewards=None, anchor_states=None, prompt_ids=b.group_ids[:, None] * 3,
                  prompt_mask=torch.ones(b.B, 1, dtype=torch.bool))
    b = b.replace(**single_turn_fields(b), answer_probs=torch.rand(b.B, 1)).validate()
    grpo = get_estimator("grpo")(b).advantages
    torch.testing.assert_close(get_estimator("igpo")(b).advantages, grpo, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(get_estimator("mt_grpo")(b).advantages, grpo, atol=1e-5, rtol=1e-5)
    centred = get_estimator("grpo")(b, scale_by_std=False).advantages
    torch.testing.assert_close(get_estimator("gigpo")(b).advantages, 2 * centred, atol=1e-5, rtol=1e-5)
