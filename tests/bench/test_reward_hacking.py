"""Micro smoke of benchmarks/reward_hacking.py: the measurements, the hackable scorer it configures, and a
one-step end-to-end call (tiny SFT, one RL step per estimator, table and figure; marked slow)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from creditlab.signals.prm import get_scorer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rh():
    spec = importlib.util.spec_from_file_location("reward_hacking", ROOT / "benchmarks" / "reward_hacking.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_text_stats_counts_wellformed_step_lines(rh):
    s = rh.text_stats(["7 + 5 = 12\n12 * 3 = 36\nAnswer: 36", "1 + 1 = 3\n2 + 2 = 9\n3 + 3 = 1\nfoo", ""])
    assert s["steps"] == pytest.approx((2 + 3 + 0) / 3)
    assert s["lines"] == pytest.approx((3 + 4 + 0) / 3)
    assert s["answer_frac"] == pytest.approx(1 / 3)


def test_scorer_kwargs_reward_form_not_correctness(rh):
    from types import SimpleNamespace

    from creditlab.batch import RolloutBatch
    from creditlab.policy import tiny_tokenizer

    tok = tiny_tokenizer()
    texts = ["1 + 1 = 3\n9 * 9 = 1\nAnswer: 5", "hello\nAnswer: 5"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    T = max(map(len, ids))
    batch = RolloutBatch(response_ids=torch.tensor([x + [0] * (T - len(x)) for x in ids]),
                         response_mask=torch.tensor([[True] * len(x) + [False] * (T - len(x)) for x in ids]),
                         group_ids=torch.tensor([0, 0]), rewards=torch.zeros(2), texts=texts)
    ctx = SimpleNamespace(policy=SimpleNamespace(tokenizer=tok), problems=[], scores=[])
    args = SimpleNamespace(answer_wellformed=True)
    r = get_scorer("oracle", **rh.scorer_kwargs(args)).score_steps(batch, ctx)
    assert r[0, :3].tolist() == [1.0, 1.0, 1.0] and r[1, :2].tolist() == [0.0, 1.0]
    args.answer_wellformed = False
    r = get_scorer("oracle", **rh.scorer_kwargs(args)).score_steps(batch, ctx)
    assert r[0, :3].tolist() == [1.0, 1.0, 0.0]


@pytest.mark.slow  # ~70-100 s on the shared 2-core box (tiny SFT + 2 RL steps + evals); run with --runslow
def test_one_step_end_to_end(rh, tmp_path):
    table = rh.main(["--out", str(tmp_path), "--img", str(tmp_path / "fig.png"), "--steps", "1", "--seeds", "0",
                     "--sft-steps", "2", "--sft-eval-problems", "2", "--prompts", "2", "--group", "2",
                     "--max-new-tokens", "16", "--eval-every", "1", "--eval-problems", "2", "--tail", "1"])
    assert [r["estimator"] for r in table] == ["sum_form", "pure", "pure_softmin"]
    assert (tmp_path / "fig.png").stat().st_size > 1000
    rows = [json.loads(x) for x in (tmp_path / "pure-s0" / "metrics.jsonl").read_text().splitlines()]
    assert "hack/steps" in rows[-1] and "prm/min" in rows[-1]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["estimators"]["sum_form"][1] == {"baseline": "token", "vr_coef": 0.0}
    assert summary["estimators"]["pure_softmin"][1] == {"vr_coef": 0.0}  # PURE's defaults: softmin, T 0.1
