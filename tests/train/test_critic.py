"""The value critics (creditlab.train.critic, creditlab.train.turn_critic): loss math, where gradients go, that
they learn, exact resume, and every critic estimator through `creditlab train`."""

import io
import json

import pytest
import torch

from creditlab.cli import main
from creditlab.policy import load_policy
from creditlab.rollout.hf import SamplingConfig, generate, sequence_logprobs
from creditlab.signals.produce import SignalContext
from creditlab.signals.rewards import outcome_to_token_rewards
from creditlab.train.config import TrainConfig
from creditlab.train.critic import ValueCritic, explained_variance, monte_carlo_returns, value_loss
from creditlab.train.loop import ppo_update
from creditlab.train.turn_critic import TurnCritic, turn_rewards, turn_table

TINY = ["--task", "arith_chain", "--task-kwargs", '{"n_steps": 2}', "--policy", "tiny",
        "--prompts-per-step", "3", "--group-size", "4", "--max-new-tokens", "16", "--eval-problems", "4",
        "--eval-every", "2", "--no-tensorboard", "--no-progress", "--sample-every", "0", "--lr", "1e-3"]


# ------------------------------------------------------------------------------------------------ pure math
def test_value_loss_matches_verls_clipped_formula_by_hand():
    # old V = .5, clip .2 -> V_clip in [.3, .7].
    # t0: V = .9, R = 1: (V-R)^2 = .01, (.7-1)^2 = .09 -> .09 (clipped branch)
    # t1: V = 0,  R = 0: 0 vs (.3-0)^2 = .09 -> .09 (clipped)
    # t2: V = 1,  R = 0: 1 vs (.7-0)^2 = .49 -> 1 (unclipped); t3 is masked (junk)
    # loss = 0.5 * mean(.09, .09, 1) = 0.19667; clipfrac = 2/3
    v, old = torch.tensor([[.9, 0.0, 1.0, 50.0]]), torch.full((1, 4), .5)
    ret, mask = torch.tensor([[1.0, 0.0, 0.0, -9.0]]), torch.tensor([[True, True, True, False]])
    loss, frac = value_loss(v, ret, old, mask, clip=0.2)
    assert float(loss) == pytest.approx(0.5 * (0.09 + 0.09 + 1.0) / 3)
    assert float(frac) == pytest.approx(2 / 3)
    unclipped, _ = value_loss(v, ret, old, mask, clip=None)
    assert float(unclipped) == pytest.approx(0.5 * (0.01 + 0.0 + 1.0) / 3)


def test_explained_variance_and_monte_carlo_returns():
    r, m = torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.ones(1, 4, dtype=torch.bool)
    assert explained_variance(r, r, m) == pytest.approx(1.0, abs=1e-4)
    assert explained_variance(r, torch.zeros_like(r), m) == pytest.approx(0.0, abs=1e-4)
    assert explained_variance(torch.ones_like(r), r, m) == 0.0  # constant returns: nothing to explain
    mask = torch.tensor([[True, True, False, True, False]])
    got = monte_carlo_returns(torch.tensor([[1.0, 2.0, 9.0, 4.0, 9.0]]), mask)
    torch.testing.assert_close(got, torch.tensor([[7.0, 6.0, 0.0, 4.0, 0.0]]))


def test_turn_table_and_turn_rewards_with_an_observation_gap():
    # row 0: turn 0 = cols 0-1, observation at 2, turn 1 = cols 3-4; row 1: one turn at cols 0-2, padding after.
    mask = torch.tensor([[True, True, False, True, True], [True, True, True, False, False]])
    turn_ids = torch.tensor([[0, 0, -1, 1, 1], [0, 0, 0, -1, -1]])
    t = turn_table(turn_ids, mask)
    assert t["rows"].tolist() == [0, 0, 1] and t["first"].tolist() == [0, 3, 0] and t["last"].tolist() == [1, 4, 2]
    assert t["next_first"].tolist() == [3, -1, -1]
    assert t["turn_of"].tolist() == [[0, 0, -1, 1, 1], [2, 2, 2, -1, -1]]
    r = torch.tensor([[0.5, 0.0, 9.0, 0.0, 1.0], [0.0, 0.0, 2.0, 9.0, 9.0]])
    assert turn_rewards(r, t).tolist() == [0.5, 1.0, 2.0]
    assert turn_rewards(r, t, gamma=0.5).tolist() == [1.0, 1.0, 2.0]  # 0.5 + 0.5 * 1.0


# ------------------------------------------------------------------------------------------------ head critic
@pytest.fixture
def tiny_setup():
    policy = load_policy("tiny", seed=0)
    batch = generate(policy, [policy.format_prompt(p) for p in ("1+2=", "30+4=")], 3,
                     SamplingConfig(max_new_tokens=8), seed=0)
    return policy, batch


def _cfg(**critic):
    cfg = TrainConfig()
    cfg.optim.update_bf16 = False  # what the trainer decides for tiny on CPU (None = auto until build_run)
    for k, v in critic.items():
        setattr(cfg.critic, k, v)
    return cfg


def test_head_values_in_produce_equal_the_hidden_states_ppo_update_uses(tiny_setup):
    policy, batch = tiny_setup
    critic = ValueCritic(_cfg(critic="head"), policy.model)
    values = critic.produce(batch, SignalContext(policy=policy)).values
    args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    with torch.no_grad():
        _, _, hidden = sequence_logprobs(policy.model, *args, return_hidden=True)  # the shared-prompt path
    want = torch.where(batch.response_mask, critic.head(hidden), 0.0)
    torch.testing.assert_close(values, want, atol=1e-5, rtol=1e-5)
    assert (values[~batch.response_mask] == 0).all() and values[batch.response_mask].abs().sum() > 0


@pytest.mark.parametrize("coef", [0.0, 0.5])
def test_head_loss_trains_the_head_and_reaches_the_trunk_only_through_its_coef(tiny_setup, coef):
    policy, batch = tiny_setup
    cfg = _cfg(critic="head", critic_coef=coef, critic_lr=1e-2)
    critic = ValueCritic(cfg, policy.model)
    batch = critic.produce(batch, SignalContext(policy=policy))
    returns = torch.where(batch.response_mask, 1.0, 0.0)
    trunk_before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    head_before = critic.head.proj.weight.clone()
    optim = torch.optim.AdamW(policy.model.parameters(), lr=1e-3, weight_decay=0.0)
    zeros = torch.zeros_like(returns)  # no policy-gradient signal: only the value loss can move the trunk
    m = ppo_update(cfg, policy, None, optim, batch, zeros, torch.Generator().manual_seed(0), [critic], returns=returns)
    assert m["critic/value_loss"] > 0
    assert not torch.equal(critic.head.proj.weight, head_before)
    moved = any(not torch.equal(trunk_before[k], v) for k, v in policy.model.state_dict().items())
    assert moved == (coef > 0)


def test_head_only_passes_fit_the_kept_features_and_leave_the_trunk(tiny_setup):
    """--critic-epochs N with a head: N-1 head-only passes after a policy step, N during --critic-warmup; the trunk
    states come from the values pass (no extra forward) and the trunk never moves."""
    from creditlab.batch import Credit

    policy, batch = tiny_setup
    target = torch.where(batch.response_mask, 0.3, 0.0)
    trunk_before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    critic = ValueCritic(_cfg(critic="head", critic_epochs=4, critic_warmup=1, critic_lr=1e-3, critic_clip=None),
                         policy.model)
    assert [critic._head_passes(s) for s in (1, 2)] == [4, 3]
    m = batch.response_mask
    errors = []
    for step in (1, 2, 3):
        ctx = SignalContext(policy=policy, step=step)
        b = critic.produce(batch.replace(values=None), ctx)
        errors.append(float(((b.values - target)[m] ** 2).mean()))
        out = critic.update(b, ctx, Credit(advantages=torch.zeros_like(target), returns=target))
        assert out["critic/head_fit_loss"] > 0 and critic.features is None  # released after the passes
    assert errors[2] < 0.5 * errors[0]
    assert all(torch.equal(trunk_before[k], v) for k, v in policy.model.state_dict().items())
    one = ValueCritic(_cfg(critic="head"), policy.model)  # defaults: no head-only pass, nothing kept
    one.produce(batch.replace(values=None), SignalContext(policy=policy, step=1))
    assert one.features is None and one._head_passes(1) == 0


def test_critic_warmup_trains_only_the_critic_first(tmp_path):
    out = tmp_path / "warm"
    args = [*TINY, "--estimator", "gae", "--critic", "head", "--critic-warmup", "2", "--critic-epochs", "3"]
    assert main(["train", *args, "--steps", "3", "--out-dir", str(out)]) == 0
    rows = _rows(out)
    assert [r.get("critic/warmup") for r in rows[1:]] == [1.0, 1.0, None]
    assert "loss/pg" not in rows[1] and "loss/pg" in rows[3]
    assert all(r["critic/head_fit_loss"] > 0 for r in rows[1:])
    assert rows[2]["samples"] == 2 * 12  # warmup steps still sample and count
    # the policy did not move during warmup: a 2-step warmup run's policy is the initial one
    out2 = tmp_path / "warm_only"
    assert main(["train", *args, "--steps", "2", "--out-dir", str(out2)]) == 0
    before, after = load_policy("tiny", seed=0).model.state_dict(), load_policy(str(out2 / "policy")).model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------------------------------------ separate critics
def _fit(critic, batch, policy, credit_returns, n, start=0):
    from creditlab.batch import Credit

    losses = []
    for step in range(start, start + n):
        b = critic.produce(batch.replace(values=None), SignalContext(policy=policy, seed=step))
        m = critic.update(b, SignalContext(policy=policy, seed=step), Credit(advantages=torch.zeros_like(b.values),
                                                                             returns=credit_returns))
        losses.append(m["critic/value_loss"])
    return losses


def test_separate_value_model_learns_a_fixed_target(tiny_setup):
    policy, batch = tiny_setup
    critic = ValueCritic(_cfg(critic="model:tiny", critic_lr=3e-3), policy.model,
                         separate=load_policy("tiny", seed=1).model)
    target = torch.where(batch.response_mask, torch.linspace(0, 1, batch.T).expand(batch.B, -1), 0.0)
    losses = _fit(critic, batch, policy, target, 12)
    assert losses[-1] < 0.3 * losses[0]


def _roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)  # plain tensors and types only


@pytest.mark.parametrize("kind", ["model", "turn"])
def test_state_dict_resumes_exactly(tiny_setup, kind):
    policy, batch = tiny_setup
    batch = batch.replace(rewards=torch.arange(batch.B, dtype=torch.float32) % 2)
    returns = monte_carlo_returns(outcome_to_token_rewards(batch.rewards, batch.response_mask), batch.response_mask)

    def make():
        cfg = _cfg(critic="model:tiny", critic_lr=3e-3)
        model = load_policy("tiny", seed=1).model
        return ValueCritic(cfg, policy.model, separate=model) if kind == "model" else TurnCritic(cfg, model)

    straight, split = make(), make()
    _fit(straight, batch, policy, returns, 3)
    _fit(split, batch, policy, returns, 2)
    resumed = make()
    resumed.load_state_dict(_roundtrip(split.state_dict()))
    _fit(resumed, batch, policy, returns, 1, start=2)
    a, b = straight.state_dict(), resumed.state_dict()
    assert set(a) == set(b)
    for name in a:
        if name != "optim":
            for k in a[name]:
                torch.testing.assert_close(b[name][k], a[name][k], rtol=0, atol=0, msg=f"{name}.{k}")
    fresh = make()
    _fit(fresh, batch, policy, returns, 1, start=2)  # without the state the third step differs
    assert any(not torch.equal(fresh.state_dict()[n][k], a[n][k]) for n in a if n != "optim" for k in a[n])


def test_turn_critic_fits_single_turn_outcomes(tiny_setup):
    policy, batch = tiny_setup
    batch = batch.replace(rewards=torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0]))
    critic = TurnCritic(_cfg(critic="model:tiny", critic_lr=3e-3), load_policy("tiny", seed=1).model)
    out = critic.produce(batch, SignalContext(policy=policy))
    assert torch.equal(out.turn_ids, torch.where(batch.response_mask, 0, -1))  # single-turn rows: one turn
    q = out.q_values
    assert (q[~batch.response_mask] == 0).all()
    first = q[:, :1].expand_as(q)
    assert torch.equal(torch.where(batch.response_mask, first, 0.0), q)  # one Q per turn, on each of its tokens
    from creditlab.batch import Credit

    losses = []
    for step in range(15):
        b = critic.produce(batch, SignalContext(policy=policy, seed=step))
        losses.append(critic.update(b, SignalContext(policy=policy, seed=step),
                                    Credit(advantages=torch.zeros_like(q)))["critic/q_loss"])
    assert losses[-1] < 0.5 * losses[0]


# ------------------------------------------------------------------------------------------------ through the CLI
def _rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# gae --critic head, poad --critic model:tiny and archer --critic model:tiny also run in the resume-equivalence test
# (tests/reliability/test_resume_components.py)
CRITIC_RUNS = [("gae", ["--critic", "head"]), ("gae", ["--critic", "model:tiny", "--critic-kl-in-reward", "0.05"]),
               ("ma_rlhf", ["--critic", "head", "--estimator-kwargs", '{"rule": "ppl"}']),
               ("poad", ["--critic", "model:tiny", "--critic-minibatches", "2"]), ("poad_turns", ["--critic", "head"]),
               ("archer", ["--critic", "model:tiny"]), ("grpo", ["--critic", "head"])]


@pytest.mark.parametrize("name,extra", CRITIC_RUNS)
def test_critic_estimators_train_tiny_without_nan(tmp_path, name, extra):
    out = tmp_path / name
    assert main(["train", *TINY, "--estimator", name, *extra, "--steps", "2", "--out-dir", str(out)]) == 0
    rows = _rows(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("critic/value_loss", "critic/explained_variance", "time/critic", "loss/pg"):
            assert isinstance(r[key], float) and r[key] == r[key] and abs(r[key]) != float("inf"), key
        assert r["credit/nonfinite"] == 0 and r["time/critic"] > 0
    blob = torch.load(next(out.glob("ckpt-*")) / "state.pt", weights_only=False)
    assert "critic" in blob["components"] and "optim" in blob["components"]["critic"]


@pytest.mark.parametrize("argv,needle", [
    (["--estimator", "gae"], "--critic head"),
    (["--estimator", "archer", "--critic", "head"], "model:<policy>"),
    (["--estimator", "gae", "--critic", "value"], "--critic must be"),
    (["--estimator", "gae", "--critic", "head", "--critic-clip", "0"], "--critic-clip"),
    (["--estimator", "grpo", "--critic-warmup", "2"], "--critic-warmup needs a critic"),
])
def test_critic_configuration_errors_are_one_line(tmp_path, capsys, argv, needle):
    assert main(["train", *TINY, *argv, "--steps", "1", "--out-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
