"""Item 3: every stateful component resumes exactly: N steps == k steps + --resume + (N - k) steps.

`COMPONENTS` lists, for every component of the trainer, the options that turn it on (keyed by the component's
checkpoint name, with an optional `/variant`). A new component (a critic,
an environment, a sampler) is covered by adding one entry: the test compares the logged metrics of both runs and
the complete final checkpoints (model, optimizer, every component's state) for exact equality.
"""

import json

import pytest
import torch
from transformers import LlamaForTokenClassification

from creditlab.cli import main
from creditlab.policy import tiny_config, tiny_tokenizer
from creditlab.signals.prm import JudgeScorer
from creditlab.train.checkpoint import read_state
from creditlab.train.components import ScorerComponent

from .conftest import TINY, read_metrics

N, K = 2, 1  # the first step after the resume is where a lost state shows (issue 12: it differed)

COMPONENTS = {
    # the oracle with label noise draws flips from its own generator
    "scorer:oracle": ["--estimator", "sum_form", "--scorer", "oracle", "--scorer-kwargs", '{"noise": 0.3}'],
    # a discriminative PRM from a local directory (frozen: its state is empty, resume must still be exact)
    "scorer:prm": ["--estimator", "sum_form", "--scorer", "prm", "--scorer-kwargs",
                   '{{"path": "{prm_dir}", "convention": "qwen"}}'],
    # LLM-as-judge: its sampling seed advances with every call
    "scorer:judge": ["--estimator", "sum_form", "--scorer", "judge", "--scorer-kwargs",
                     '{"policy": "tiny", "max_new_tokens": 8}'],
    # the online implicit PRM: its weights, frozen reference and optimizer (issue 12, item 3)
    "scorer:implicit": ["--estimator", "prime", "--scorer", "implicit", "--scorer-kwargs", '{"lr": 0.001}'],
    # ... and OPRL's, which divides by the rollout's log-probs (no reference model in its state)
    "scorer:implicit/oprl": ["--estimator", "oprl", "--scorer", "implicit", "--scorer-kwargs",
                             '{"mode": "oprl", "lr": 0.001}'],
    # Monte-Carlo values: no state, the continuations are seeded by the step (spo_chain's cuts, vineppo's steps)
    "mc": ["--estimator", "spo_chain", "--mc-samples", "2"],
    "mc/vineppo": ["--estimator", "vineppo", "--mc-samples", "2"],
    # critics: a value head on the policy's trunk (its own AdamW), a separate value model, ArCHer's turn critic
    # (online + target copies and their optimizer)
    "critic": ["--estimator", "gae", "--critic", "head"],
    "critic/model": ["--estimator", "poad", "--critic", "model:tiny", "--critic-kl-in-reward", "0.05"],
    "critic/archer": ["--estimator", "archer", "--critic", "model:tiny"],
    # attention signals: one extra forward with the current policy (stateless)
    "attention": ["--estimator", "attn_coupled", "--attn-horizon-lo", "1", "--attn-horizon-hi", "8"],
    # truncate-and-answer at budgets, seeded by the step; BRPO's summary tokens join the update (2 minibatches:
    # their old log-probs come from a no-grad forward)
    "budget": ["--estimator", "brpo", "--budgets", "4,8,16", "--budget-answers", "2", "--budget-answer-tokens", "3",
               "--minibatches", "2"],
    # ... and at step boundaries (VSRM)
    "budget/vsrm": ["--estimator", "vsrm", "--budget-step-split", "newline", "--budget-answers", "2",
                    "--budget-answer-tokens", "3"],
}


@pytest.fixture(scope="module")
def prm_dir(tmp_path_factory):
    """A qwen-convention PRM (2-class token head, <extra_0> tag) built from the tiny model's architecture."""
    out = tmp_path_factory.mktemp("prm")
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    cfg = tiny_config(len(tok), n_layers=1, d_model=32, n_heads=2)
    cfg.num_labels = 2
    torch.manual_seed(0)
    LlamaForTokenClassification(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "eval/"))} for r in rows]


def run(args, out, steps, resume=False):
    argv = ["train", *TINY, *args, "--steps", str(steps), "--out-dir", str(out), *(["--resume"] if resume else [])]
    assert main(argv) == 0


@pytest.mark.parametrize("name", list(COMPONENTS))
def test_resume_equals_an_uninterrupted_run(tmp_path, prm_dir, name):
    args = [a.format(prm_dir=prm_dir) if "{prm_dir}" in a else a for a in COMPONENTS[name]]
    run(args, tmp_path / "straight", N)
    run(args, tmp_path / "split", K)
    run(args, tmp_path / "split", N, resume=True)
    straight, split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(N + 1))
    assert comparable(straight) == comparable(split)
    a, b = (read_state(tmp_path / d / f"ckpt-{N:06d}") for d in ("straight", "split"))
    assert name.split("/")[0] in a["components"]  # the component is really in this run
    assert_same(a, b)


def test_the_comparison_sees_a_lost_component_state(tmp_path, monkeypatch):
    """Resuming the implicit PRM without its state (what creditlab did before) must fail the test above."""
    args = COMPONENTS["scorer:implicit"]
    run(args, tmp_path / "straight", 2)
    run(args, tmp_path / "split", 1)
    monkeypatch.setattr(ScorerComponent, "load_state_dict", lambda self, state: None)
    run(args, tmp_path / "split", 2, resume=True)
    a, b = (read_state(tmp_path / d / "ckpt-000002") for d in ("straight", "split"))
    with pytest.raises(AssertionError):
        assert_same(a, b)


def test_judge_critiques_continue_after_a_state_round_trip():
    """The judge's state is its call counter: a restored judge samples the critiques an uninterrupted one would."""
    prompts = ["Problem: 1 + 1\n\nSolution:\nStep 1: 1 + 1 = 2", "Problem: 2 * 3\n\nSolution:\nStep 1: 2 * 3 = 5"]
    straight = JudgeScorer(policy="tiny", max_new_tokens=12, seed=0)
    straight._calls = 1  # as after one scored batch
    restored = JudgeScorer(policy="tiny", max_new_tokens=12, seed=0)
    restored.load_state_dict(json.loads(json.dumps(straight.state_dict())))
    fresh = JudgeScorer(policy="tiny", max_new_tokens=12, seed=0)
    assert restored.critiques(prompts) == straight.critiques(prompts) != fresh.critiques(prompts)
