"""Monte-Carlo values (creditlab.signals.mc): cut rules, convergence to a value known in closed form, shared prefill,
cost counters, determinism, and the trainer wiring (`creditlab train --estimator spo_chain --mc-samples 2`)."""

import json
import math

import pytest
import torch

from creditlab.batch import RolloutBatch
from creditlab.cli import main
from creditlab.policy import load_policy
from creditlab.rollout.hf import SamplingConfig
from creditlab.signals.mc import continuation_values, produce_mc, spo_chain_cuts, step_start_cuts
from creditlab.signals.produce import SignalContext
from creditlab.tasks import Problem, Score


@pytest.fixture(autouse=True, scope="module")
def _single_thread():  # the tiny model's matmuls are too small for intra-op threads (see tests/rollout/conftest.py)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class SevenTask:
    """Reward 1 iff the response contains the character "7" (a task whose value is known in closed form below)."""

    name = "seven"

    def problems(self, split, n, seed):
        return [Problem(prompt=f"q{i}", answer="7") for i in range(n)]

    def score(self, problem, response):
        return Score(reward=float("7" in response), correct="7" in response)

    def demonstration(self, problem):
        return "7"


def uniform_tiny():
    """The tiny model with zero output embeddings: every next token is uniform over its 100 ids (EOS among them)."""
    policy = load_policy("tiny", seed=0)
    with torch.no_grad():
        policy.model.get_output_embeddings().weight.zero_()
    return policy


def true_value(budget, has_seven, V=100):
    """P(a "7" before EOS within `budget` uniform tokens) = sum_i q^i / V with q = (V-2)/V, = (1 - q^budget) / 2."""
    return 1.0 if has_seven else 0.5 * (1 - ((V - 2) / V) ** budget)


def hand_batch(policy, rows, group_ids=None):
    """Responses given as text (no EOS), prompt "q<group>" per row."""
    tok = policy.tokenizer
    ids = [tok.encode(r, add_special_tokens=False) for r in rows]
    T = max(len(x) for x in ids)
    resp = torch.full((len(rows), T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, x in enumerate(ids):
        resp[b, : len(x)] = torch.tensor(x)
        mask[b, : len(x)] = True
    groups = group_ids or list(range(len(rows)))
    p_ids, p_mask = policy.encode_prompts([policy.format_prompt(f"q{g}") for g in groups])
    return RolloutBatch(response_ids=resp, response_mask=mask, group_ids=torch.tensor(groups),
                        rewards=torch.zeros(len(rows)), prompt_ids=p_ids, prompt_mask=p_mask,
                        texts=list(rows))


def ctx_for(policy, n_groups, seed=0):
    task = SevenTask()
    return SignalContext(policy=policy, problems=task.problems("train", n_groups, 0), task=task, seed=seed)


# ---------------------------------------------------------------- cut rules
def test_spo_chain_cuts_follow_the_reference_rule():
    p = torch.tensor([[.5, .95, .95, .6, .95, .95], [.95, .5, .5, .5, .5, .95]])
    batch = RolloutBatch(response_ids=torch.ones(2, 6, dtype=torch.long), response_mask=torch.ones(2, 6).bool(),
                         group_ids=torch.zeros(2, dtype=torch.long), rewards=torch.zeros(2), logprobs=p.log())
    cuts, fill = spo_chain_cuts(batch, interval=1)
    assert cuts.tolist() == [[0, 3, -1, -1, -1], [0, 1, 2, 3, 4]] and not fill.any()  # methods.md: C = {-1, 2}
    code, _ = spo_chain_cuts(batch, interval=1, prompt_value="zero")
    assert code.tolist() == [[0, 3, -1, -1], [1, 2, 3, 4]]  # row 1: token 0 is sure, so no prompt state
    every2, _ = spo_chain_cuts(batch, interval=2, prompt_value="zero")
    assert every2.tolist() == [[0, -1], [1, 3]]  # L[::2]: low-prob tokens 0, 3 -> 0; 1, 2, 3, 4 -> 1, 3
    gm, _ = spo_chain_cuts(batch, interval=1, prompt_value="group_mean")
    assert gm.tolist() == [[3, -1, -1, -1], [1, 2, 3, 4]]


def test_step_start_cuts_and_max_steps_fill():
    step_ids = torch.tensor([[0, 0, -1, 1, 1, -1, 2, 2], [-1, 0, 0, 0, -1, -1, -1, -1]])
    mask = torch.tensor([[True] * 8, [True] * 4 + [False] * 4])
    batch = RolloutBatch(response_ids=torch.ones(2, 8, dtype=torch.long), response_mask=mask,
                         group_ids=torch.zeros(2, dtype=torch.long), rewards=torch.tensor([1.0, 0.0]),
                         step_ids=step_ids)
    cuts, fill = step_start_cuts(batch)
    assert cuts.tolist() == [[0, 3, 6], [0, -1, -1]] and not fill.any()
    capped, fill = step_start_cuts(batch, max_steps=1)  # s_0, s_1 sampled; s_2 filled with R
    assert capped.tolist() == [[0, 3, 6], [0, -1, -1]] and fill.tolist() == [[False, False, True], [False] * 3]
    capped0, fill0 = step_start_cuts(batch, max_steps=0)
    assert capped0.tolist() == [[0, 3], [0, -1]] and fill0.tolist() == [[False, True], [False, False]]


# ---------------------------------------------------------------- values
def test_values_converge_to_the_closed_form_at_one_over_sqrt_k():
    policy = uniform_tiny()
    rows = ["abcdefghijkl", "mnopqrstuvwx", "ab7defghijkl"]  # the third holds a "7" from column 2 on
    batch = hand_batch(policy, rows)
    cuts = torch.tensor([[0, 4, 8, 11]] * 3)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=16)
    truth = torch.tensor([[true_value(16 - c, "7" in r[:c]) for c in (0, 4, 8, 11)] for r in rows])
    rmse, stderr = {}, {}
    for K in (8, 32, 128):
        est = continuation_values(batch, cuts, ctx_for(policy, 3), samples=K, sampling=sampling,
                                  unfinished_penalty=None, max_rows=1024, seed=1)
        assert est.counts.tolist() == [[K] * 4] * 3
        rmse[K] = float(((est.values.double() - truth) ** 2).mean().sqrt())
        stderr[K] = float(est.stderr.mean())
    assert rmse[8] > rmse[32] > rmse[128]
    assert 2.0 < rmse[8] / rmse[128] < 8.0  # 1/sqrt(K): a factor 4 expected
    assert 2.0 < stderr[8] / stderr[128] < 8.0
    sd_true = float((truth * (1 - truth)).mean().sqrt())  # binomial standard deviation
    assert rmse[128] * math.sqrt(128) == pytest.approx(sd_true, rel=0.5)


def test_prefixes_are_prefilled_once_and_shared_by_their_continuations():
    policy = uniform_tiny()
    batch = hand_batch(policy, ["abcd", "abce", "xyz"], group_ids=[0, 0, 1])
    cuts = torch.tensor([[0, 2], [0, 3], [0, 1]])  # the group's prompt state is one state; "ab" != "abc"
    calls = []
    hook = policy.model.get_input_embeddings().register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    ctx = ctx_for(policy, 2)
    try:
        est = continuation_values(batch, cuts, ctx, samples=8, sampling=SamplingConfig(max_new_tokens=6),
                                  unfinished_penalty=None)
    finally:
        hook.remove()
    assert ctx.counters["mc/prefixes"] == 5  # (g0, ""), (g0, "ab"), (g0, "abc"), (g1, ""), (g1, "x")
    assert ctx.counters["samples/extra"] == 5 * 8
    assert calls[0][0] == 5  # one prefill row per distinct state, not 5 * 8
    assert all(shape == (40, 1) for shape in calls[1:])  # decoding: one token per continuation row
    assert 5 * 8 <= ctx.counters["tokens/extra"] <= 5 * 8 * 6
    assert est.values[0, 0] == est.values[1, 0]  # one estimate for the shared state


def test_unfinished_penalty_and_fill_and_determinism():
    policy = uniform_tiny()
    batch = hand_batch(policy, ["abcd", "a7cd"]).replace(rewards=torch.tensor([0.25, 0.75]))
    cuts = torch.tensor([[0, 3], [0, 3]])
    fill = torch.tensor([[False, True], [False, False]])
    sampling = SamplingConfig(max_new_tokens=4)  # budget 1 token at cut 3: EOS w.p. 1/100, else truncated
    est = continuation_values(batch, cuts, ctx_for(policy, 2), samples=64, sampling=sampling, fill=fill,
                              unfinished_penalty=-1.0)
    assert est.values[0, 1] == pytest.approx(0.25) and est.counts[0, 1] == 0  # filled with the row's reward
    assert est.values[1, 1] <= -0.9  # nearly every 1-token continuation is cut by the limit
    again = continuation_values(batch, cuts, ctx_for(policy, 2), samples=64, sampling=sampling, fill=fill,
                                unfinished_penalty=-1.0)
    torch.testing.assert_close(again.values, est.values)
    other = continuation_values(batch, cuts, ctx_for(policy, 2, seed=5), samples=64, sampling=sampling, fill=fill,
                                unfinished_penalty=-1.0)
    assert not torch.equal(other.values[:, 0], est.values[:, 0])


def test_produce_mc_feeds_the_estimators_and_errors_are_one_line():
    from creditlab import get_estimator

    policy = load_policy("tiny", seed=0)
    batch = hand_batch(policy, ["1 + 2 = 3\n3 + 4 = 7", "1 + 2 = 4\n4 + 4 = 8"], group_ids=[0, 0])
    batch = batch.replace(logprobs=torch.full(batch.response_ids.shape, -1.0).masked_fill(~batch.response_mask, 0))
    ctx = ctx_for(policy, 1)
    out, est = produce_mc(batch, ctx, "vineppo", {"steps": "newline"}, samples=2,
                          sampling=SamplingConfig(max_new_tokens=24))
    assert out.mc_cuts.tolist() == [[0, 10], [0, 10]]
    assert torch.isfinite(get_estimator("vineppo")(out).advantages).all()
    out, _ = produce_mc(batch, ctx, "spo_chain", {"interval": 4}, samples=2, sampling=SamplingConfig(max_new_tokens=24))
    assert out.mc_cuts[0].tolist()[:3] == [0, 4, 8]
    assert torch.isfinite(get_estimator("spo_chain")(out).advantages).all()
    with pytest.raises(ValueError, match="prompt_ids"):
        continuation_values(batch.replace(prompt_ids=None), est.cuts, ctx, samples=2, sampling=SamplingConfig())
    with pytest.raises(ValueError, match="task"):
        continuation_values(batch, est.cuts, SignalContext(policy=policy), samples=2, sampling=SamplingConfig())
    with pytest.raises(ValueError, match="samples"):
        continuation_values(batch, est.cuts, ctx, samples=0, sampling=SamplingConfig())


# ---------------------------------------------------------------- trainer
TRAIN = ["--task", "arith_chain", "--task-kwargs", '{"n_steps": 2}', "--policy", "tiny", "--prompts-per-step", "2",
         "--group-size", "3", "--max-new-tokens", "12", "--eval-problems", "2", "--no-tensorboard", "--no-progress",
         "--sample-every", "0", "--mc-samples", "2"]


def rows(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_train_spo_chain_charges_continuations_and_resumes_exactly(tmp_path):
    args = [*TRAIN, "--estimator", "spo_chain", "--checkpoint-every", "1"]
    assert main(["train", *args, "--steps", "2", "--out-dir", str(tmp_path / "straight")]) == 0
    assert main(["train", *args, "--steps", "1", "--out-dir", str(tmp_path / "resumed")]) == 0
    assert main(["train", *args, "--steps", "2", "--out-dir", str(tmp_path / "resumed"), "--resume"]) == 0
    straight, resumed = rows(tmp_path / "straight"), rows(tmp_path / "resumed")
    for r in straight[1:]:
        assert r["samples/extra"] == 2 * r["mc/prefixes"] > 0 and r["time/mc"] > 0
        assert r["tokens/extra"] > 0 and r["credit/nonfinite"] == 0
    assert straight[2]["samples"] == 2 * 6 + straight[1]["samples/extra"] + straight[2]["samples/extra"]
    def strip(r):  # timings differ; the 1-step run also evaluates at its last step
        return {k: v for k, v in r.items() if not k.startswith("time/") and k != "eval/accuracy"}

    assert [strip(r) for r in straight] == [strip(r) for r in resumed]  # same cuts, continuations, values


def test_train_errors_name_the_missing_option(tmp_path, capsys):
    assert main(["train", *TRAIN, "--steps", "1", "--estimator", "spo_tree", "--out-dir", str(tmp_path / "a")]) == 2
    assert "--rollout tree" in capsys.readouterr().err
    assert main(["train", *TRAIN, "--steps", "1", "--estimator", "vineppo", "--mc-samples", "0",
                 "--out-dir", str(tmp_path / "b")]) == 2
    assert "--mc-samples must be >= 1" in capsys.readouterr().err
