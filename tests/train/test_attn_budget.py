"""Attention and budget credit through `creditlab train` on the tiny policy: the components fill their fields, the
anytime evaluation is logged, bad options are one-line errors. (Exact resume with these components, BRPO's summary
loss included: tests/reliability/test_resume_components.py.)"""

import json

import pytest

from creditlab.cli import main

BASE = ["--task", "arith_chain", "--task-kwargs", '{"n_steps": 2}', "--policy", "tiny", "--prompts-per-step", "2",
        "--group-size", "2", "--max-new-tokens", "8", "--eval-problems", "2", "--no-tensorboard", "--no-progress",
        "--sample-every", "0", "--lr", "1e-3"]


def rows(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_budgets_add_the_anytime_curve_to_any_run(tmp_path):
    out = tmp_path / "grpo"
    assert main(["train", *BASE, "--estimator", "grpo", "--steps", "1", "--budgets", "4,8", "--out-dir", str(out)]) == 0
    first, last = rows(out)[0], rows(out)[-1]
    for r in (first, last):
        assert {"eval/acc@4", "eval/acc@8", "eval/anytime_auc", "eval/length", "eval/accuracy"} <= set(r)
    assert "samples/extra" not in last  # plain GRPO samples nothing extra


def test_attention_component_fills_signals(tmp_path):
    out = tmp_path / "coupled"
    assert main(["train", *BASE, "--estimator", "attn_coupled", "--steps", "1", "--attn-layers", "0",
                 "--attn-horizon-lo", "1", "--attn-horizon-hi", "50", "--out-dir", str(out)]) == 0
    last = rows(out)[-1]
    assert last["time/attn_signal"] > 0 and 0 <= last["credit/attn_selected_punct_frac"] <= 1
    assert last["credit/attn_selected_frac"] > 0


def test_vsrm_and_hbpo_train(tmp_path):
    assert main(["train", *BASE, "--estimator", "vsrm", "--steps", "1", "--budget-step-split", "newline",
                 "--budget-answers", "2", "--budget-answer-tokens", "3", "--out-dir", str(tmp_path / "vsrm")]) == 0
    assert rows(tmp_path / "vsrm")[-1]["budget/cuts_per_row"] >= 1
    assert main(["train", *BASE, "--estimator", "hbpo", "--steps", "1", "--budgets", "4,8", "--estimator-kwargs",
                 '{"l_max": 8}', "--out-dir", str(tmp_path / "hbpo")]) == 0
    assert "credit/hbpo_reward_mean" in rows(tmp_path / "hbpo")[-1]


@pytest.mark.parametrize("extra,needle", [
    (["--estimator", "hbpo", "--budgets", "4,8,16"], "group-size"),
    (["--estimator", "brpo", "--budgets", "8,4"], "--budgets"),
    (["--estimator", "attn_local", "--attn-layers", "9"], "attn-layers"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, extra, needle):
    assert main(["train", *BASE, "--steps", "1", *extra, "--out-dir", str(tmp_path / "bad")]) == 2
    assert needle in capsys.readouterr().err


def test_brpo_summary_rows_in_passes_give_the_one_graph_gradient():
    # BRPO's summary rows (K cuts x A answers per row) are run in passes of about the micro-batch's token count,
    # each backwarded at once, when ppo_update passes "backward_weight"; the gradient and the logged value equal
    # one graph over all of them (the path without the weight) up to float order.
    import torch

    from creditlab.policy import load_policy
    from creditlab.rollout.hf import SamplingConfig, generate
    from creditlab.signals.produce import SignalContext
    from creditlab.tasks import get_task
    from creditlab.train.attn_budget import BudgetComponent, _positions
    from creditlab.train.config import TrainConfig

    policy, task = load_policy("tiny", seed=0), get_task("arith_chain", n_steps=2)
    problems = task.problems("train", 2, seed=0)
    batch = generate(policy, [policy.format_prompt(p.prompt) for p in problems], 3,
                     SamplingConfig(max_new_tokens=12), seed=0)
    scores = [task.score(problems[int(g)], t) for g, t in zip(batch.group_ids, batch.texts)]
    batch = batch.replace(rewards=torch.tensor([s.reward for s in scores]))
    cfg = TrainConfig()
    cfg.optim.update_bf16 = False
    cfg.budget.budgets, cfg.budget.budget_answers, cfg.budget.budget_answer_tokens = "3,6,9", 2, 3
    comp = BudgetComponent(cfg, "brpo", policy, task)
    comp.produce(batch, SignalContext(policy=policy, problems=problems, scores=scores, task=task, seed=0))
    # an untrained policy scores 0 everywhere (zero advantages): give the summary rows advantages to move on
    comp._summ["adv"] = torch.randn(len(comp._summ["adv"]), generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([0, 2, 5])
    pick = torch.isin(comp._summ["row"], idx).nonzero().squeeze(1)
    passes = comp._passes(pick, _positions(batch, idx))
    assert len(passes) > 1 and torch.equal(torch.cat(passes), pick)
    firsts = [comp._summ["prompt_ids"][p[0]] for p in passes[1:]]
    lasts = [comp._summ["prompt_ids"][p[-1]] for p in passes[:-1]]
    assert not any(torch.equal(a, b) for a, b in zip(lasts, firsts))  # no prefix group is split between passes

    def grads(outputs):
        policy.model.zero_grad(set_to_none=True)
        term, m = comp.loss(batch, idx, outputs)
        if term.requires_grad:
            (term * 0.7).backward()
        return [p.grad.clone() for p in policy.model.parameters() if p.grad is not None], term, m

    g_one, t_one, m_one = grads({})
    g_pass, t_pass, m_pass = grads({"backward_weight": torch.tensor(0.7)})
    assert not t_pass.requires_grad and float(t_pass) == pytest.approx(float(t_one.detach()), rel=1e-5)
    assert m_pass["loss/summary"] == pytest.approx(m_one["loss/summary"], rel=1e-5)
    assert len(g_one) == len(g_pass) > 0 and any(bool(g.abs().sum() > 0) for g in g_one)
    for a, b in zip(g_one, g_pass):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
