"""Every registered estimator trains `tiny` on arith_chain through `creditlab train` without NaN.

Signals come from their producers: oracle step labels/rewards from the task, planning masks from the strategic-
gram detector, strata from the step count, implicit-PRM log-probs from `--scorer implicit`, Monte-Carlo values from
the MC component (--mc-samples 2), segment trees from `--rollout tree`.
"""

import json

import pytest

from creditlab import list_estimators
from creditlab.cli import main
from creditlab.registry import get_spec

BASE = ["--task", "arith_chain", "--task-kwargs", '{"n_steps": 2}', "--policy", "tiny", "--steps", "2",
        "--prompts-per-step", "3", "--group-size", "4", "--max-new-tokens", "16", "--eval-problems", "2",
        "--no-tensorboard", "--no-progress", "--sample-every", "0"]


def scorer_args(name: str) -> list[str]:
    needs = get_spec(name).needs
    tree = ["--rollout", "tree", "--tree-fanout", "2,2", "--tree-segment-len", "6"] if "tree_node" in needs else []
    mc = ["--mc-samples", "2"] if "mc_values" in needs else []
    return (["--scorer", "implicit"] if "prm_logprobs" in needs else []) + tree + mc


@pytest.mark.parametrize("name", [n for n in list_estimators() if "values" not in get_spec(n).needs])
def test_estimator_trains_tiny_without_nan(tmp_path, name):
    out = tmp_path / name
    assert main(["train", *BASE, "--estimator", name, *scorer_args(name), "--out-dir", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key, value in r.items():
            if isinstance(value, float):
                assert value == value and abs(value) != float("inf"), (name, key)
        assert r["credit/nonfinite"] == 0


def test_critic_estimator_without_a_critic_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *BASE, "--estimator", "gae", "--out-dir", str(tmp_path / "gae")]) == 2
    err = capsys.readouterr().err
    assert "token_rewards" in err and "cannot run" in err
