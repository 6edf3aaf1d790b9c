"""Multi-turn agents through TRL: creditlab's environments as a GRPOTrainer `rollout_func` (`EnvRollout`), with
the real CreditGRPOTrainer and creditlab's tiny policy warm-started on Sokoban solutions (so that episodes differ:
some moves valid, some not). The estimator must see the environment's turns (the runs of TRL's env_mask), its
per-turn rewards, anchor states and strata, and give exactly what it gives on creditlab's own batch of the same
episodes; observation tokens get no credit."""

from __future__ import annotations

import pytest

pytest.importorskip("trl", reason="trl is not installed (make test-trl builds .venv-trl)")

import sys
from pathlib import Path

import torch
from trl import GRPOConfig

from creditlab.integrations._signals import turn_ids_from_mask
from creditlab.integrations.trl import CreditGRPOTrainer
from creditlab.integrations.trl_agents import EnvRollout
from creditlab.policy import load_policy
from creditlab.registry import get_spec

sys.path.insert(0, str(Path(__file__).parent))
import trl_mp_worker as w

G, B = 4, 8


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    from creditlab.train.config import SFTConfig
    from creditlab.train.sft import sft

    out = tmp_path_factory.mktemp("sokoban_sft")
    sft(SFTConfig(task="sokoban", task_kwargs="{}", policy="tiny", out_dir=str(out), steps=40, batch_size=16,
                  lr=3e-3, eval_problems=4, max_new_tokens=16))
    return str(out)


def make_trainer(tmp_path, estimator, env, policy="tiny", **kwargs):
    policy = load_policy(policy, seed=0)
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=B, num_generations=G,
                      max_completion_length=64, max_steps=1, learning_rate=1e-3, logging_steps=1, report_to="none",
                      save_strategy="no", beta=0.0, seed=0, bf16=False, fp16=False, dataloader_num_workers=0,
                      disable_tqdm=True)
    return w.record_estimator_calls(CreditGRPOTrainer(
        model=policy.model, processing_class=policy.tokenizer, args=args, train_dataset=env.dataset(8, seed=0),
        reward_funcs=env.reward, rollout_func=env, estimator=estimator, row_fields=env.row_fields(estimator),
        **kwargs))


@pytest.mark.parametrize("estimator", ["gigpo", "mt_grpo", "stratified"])
def test_env_rollout_gives_the_estimator_the_environments_turns(tmp_path, warm, estimator):
    env = EnvRollout("sokoban", max_turns=3, action_tokens=6)
    trainer = make_trainer(tmp_path, estimator, env, policy=warm)
    trainer.train()
    (batch, adv), = trainer.calls
    own, scores = env.last  # creditlab's own RolloutBatch of the same episodes
    assert batch.B == own.B == B
    # the turns are the runs of the env_mask, and the same as the engine's; observations are outside the mask
    T = own.T
    assert torch.equal(batch.response_mask[:, :T], own.response_mask) and not batch.response_mask[:, T:].any()
    turns = batch.turn_ids if batch.turn_ids is not None else turn_ids_from_mask(batch.response_mask)
    assert torch.equal(turns[:, :T], own.turn_ids)
    assert int(own.turn_ids.max()) >= 1  # episodes run several turns
    assert len(set(batch.rewards.tolist())) > 1  # and differ, so the credit is not trivially 0
    obs = (own.response_ids != 0) & ~own.response_mask  # observation tokens inside the rows
    assert obs.any() and (adv[:, :T][obs] == 0).all()
    assert torch.allclose(batch.rewards, torch.tensor([s.reward for s in scores]))
    if "turn_rewards" in get_spec(estimator).needs:
        assert torch.allclose(batch.turn_rewards, own.turn_rewards)
        assert torch.allclose(batch.turn_rewards.sum(1), batch.rewards, atol=1e-6)
    if "anchor_states" in get_spec(estimator).needs:
        assert torch.equal(batch.anchor_states, own.anchor_states)
    if estimator == "stratified":  # Sokoban has no tool: turns per episode, as the creditlab trainer's strata
        from creditlab.signals.strata import strata_by_tool_calls

        assert torch.equal(batch.strata, strata_by_tool_calls(scores, None, max_stratum=4))
    # the advantages TRL trains on are the estimator's on creditlab's own batch (TRL's groups = reset seeds)
    want = get_spec(estimator).fn(own.replace(group_ids=torch.arange(B) // G, strata=batch.strata)).advantages
    torch.testing.assert_close(adv[:, :T], want, atol=1e-5, rtol=1e-5)
    assert adv.abs().sum() > 0


def test_igpo_gets_the_policys_answer_probabilities_per_turn(tmp_path):
    # search: the untrained policy's episodes all score the same, but the information gain of each turn differs
    env = EnvRollout("search", max_turns=3, action_tokens=6, answer_probs=True)
    trainer = make_trainer(tmp_path, "igpo", env)
    trainer.train()
    (batch, adv), = trainer.calls
    own, _ = env.last  # the engine's batch with the answer probabilities computed on it
    T = own.T
    assert own.answer_probs is not None and torch.allclose(batch.answer_probs, own.answer_probs)
    want = get_spec("igpo").fn(own.replace(group_ids=torch.arange(B) // G)).advantages
    torch.testing.assert_close(adv[:, :T], want, atol=1e-5, rtol=1e-5)
    assert adv.abs().sum() > 0
    with pytest.raises(ValueError, match="answer_probs=True"):
        EnvRollout("search").row_fields("igpo")
    with pytest.raises(ValueError, match="answer_template"):
        EnvRollout("sokoban", answer_probs=True)


def test_env_rollout_refuses_prompts_it_did_not_make_and_non_environment_tasks(tmp_path):
    with pytest.raises(ValueError, match="environment task"):
        EnvRollout("arith_chain")
    env = EnvRollout("frozenlake", max_turns=2, action_tokens=4)
    env.dataset(2)
    with pytest.raises(ValueError, match="did not make"):
        env(["What is 2+2?"], trainer=None)
