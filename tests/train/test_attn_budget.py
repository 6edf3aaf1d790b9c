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
