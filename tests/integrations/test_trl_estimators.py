"""Every registered estimator from CreditGRPOTrainer (or refused at construction with the way to supply it), and
TRL's semantics: scale_rewards, unscorable completions, infinite rewards, estimator_kwargs checked at construction.

Completions come from a deterministic rollout function (no sampling), so every case sees the same batch:
2 groups of 4, lengths 3-8, steps separated by ";", the gram "a b" in every completion.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="trl is not installed (make test-trl builds .venv-trl)")

import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from creditlab.batch import FIELDS, RolloutBatch
from creditlab.integrations.trl import FIELD_HOW, CreditGRPOTrainer, unsupported_fields
from creditlab.registry import get_spec, list_estimators
from creditlab.signals.attention import AttnSignalConfig, attention_producers
from creditlab.signals.steps import Segmenter, pad_step_values

sys.path.insert(0, str(Path(__file__).parent))
import trl_mp_worker as w

G, B = 4, 8
SPLIT = Segmenter("regex", w.SPLIT)


def words(j: int) -> list[str]:
    n = 3 + (j * 5) % 6  # 3..8 tokens with EOS
    tail = [w.WORDS[(k * (j + 1)) % 5] for k in range(10)]
    return ["a", "b", ";", *tail][: n - 1]


def rollout(prompts, trainer):
    tok = trainer.processing_class
    completion_ids = [tok(" ".join(words(j)), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                      for j in range(len(prompts))]
    return {"prompt_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts],
            "completion_ids": completion_ids, "logprobs": [[0.0] * len(c) for c in completion_ids]}


def step_label(prompts, completions, steps, completion_ids, **kwargs):
    return [[True if "b" in s.split() else False if "c" in s.split() else None for s in row] for row in steps]


def values_from_critic(batch: RolloutBatch) -> torch.Tensor:
    return torch.where(batch.response_mask, 0.1 * torch.arange(batch.T).float(), 0.0)  # a fixed toy critic


def one_turn(field):
    """Single-turn completions as one-turn episodes (creditlab.signals.turns), one producer per turn field."""
    from creditlab.signals.turns import single_turn_fields

    return lambda batch: single_turn_fields(batch)[field]


TURNS = {f: one_turn(f) for f in ("turn_ids", "turn_rewards", "anchor_states")}


def toy_cuts(batch: RolloutBatch) -> torch.Tensor:  # a toy Monte-Carlo source: the prompt and mid-response states
    half = batch.response_mask.sum(dim=1) // 2
    return torch.stack([torch.zeros_like(half), torch.where(half > 0, half, -1)], dim=1)  # [B, 2]


def toy_values(batch: RolloutBatch) -> torch.Tensor:  # the toy values at toy_cuts
    return torch.tensor([0.25, 0.5]).expand(batch.B, 2).clone()


def toy_tree(batch: RolloutBatch) -> torch.Tensor:  # a toy segment tree: each row a chain of two segments
    half = batch.response_mask.sum(dim=1, keepdim=True) // 2
    node = 2 * torch.arange(batch.B)[:, None] + (torch.arange(batch.T)[None, :] >= half)
    return torch.where(batch.response_mask, node, -1)


SOURCES = {  # how each estimator's extra fields are supplied from TRL
    "gigpo": dict(field_producers=TURNS),
    "mt_grpo": dict(field_producers={f: TURNS[f] for f in ("turn_ids", "turn_rewards")}),
    "igpo": dict(field_producers={"turn_ids": TURNS["turn_ids"],
                                  "answer_probs": lambda batch: torch.full((batch.B, 1), 0.5)}),
    "oprl_turn": dict(implicit_prm={"lr": 1e-2}, field_producers={"turn_ids": TURNS["turn_ids"]}),
    "gae": dict(field_producers={"values": values_from_critic}),
    # critic estimators: the toy critic above; ma_rlhf also reads reference log-probs (beta = 0 here: a toy source),
    # archer an utterance-level Q of each turn
    "ma_rlhf": dict(field_producers={"values": values_from_critic,
                                     "ref_logprobs": lambda batch: torch.where(batch.response_mask, -0.5, 0.0)}),
    "poad": dict(field_producers={"values": values_from_critic}, step_split=SPLIT),
    "poad_turns": dict(field_producers={"values": values_from_critic, "turn_ids": TURNS["turn_ids"]}),
    "archer": dict(field_producers={"values": values_from_critic, "turn_ids": TURNS["turn_ids"],
                                    "q_values": lambda batch: torch.where(batch.response_mask, 0.3, 0.0)}),
    "hicra": dict(planning_grams=["a b"]),
    "stratified": dict(row_fields={"strata": "level"}),
    "sum_form": dict(step_reward_funcs=w.step_reward, step_split=SPLIT),
    "pure": dict(step_reward_funcs=w.step_reward, step_split=SPLIT),
    "capo": dict(step_reward_funcs=w.step_reward, step_split=SPLIT),
    "tp_grpo": dict(step_label_func=step_label, step_split=SPLIT),
    "prime": dict(implicit_prm={"lr": 1e-2}),
    "oprl": dict(implicit_prm={"lr": 1e-2}, step_split=SPLIT),
    # the rollout's log-probs are 0 (p = 1), which SPO's probability mask would remove entirely
    "spo_chain": dict(field_producers={"mc_cuts": toy_cuts, "mc_values": toy_values},
                      estimator_kwargs={"prob_mask": False}),
    "vineppo": dict(field_producers={"mc_cuts": toy_cuts, "mc_values": toy_values}),
    "spo_tree": dict(field_producers={"tree_node": toy_tree}, estimator_kwargs={"prob_mask": False}),
    # attention credit: the policy's own attention (a real model's forward; here a fixed copy of the toy model)
    **{n: (lambda tok, n=n: dict(field_producers={
        f: fn for f, fn in attention_producers(w.model(tok), tok, AttnSignalConfig(h_lo=1, h_hi=5)).items()
        if f in get_spec(n).needs})) for n in ("attn_local", "attn_global", "attn_coupled")},
    # budget credit: cut points and the mean answer score after each (a toy scorer here; creditlab.signals.budget
    # computes them by truncate-and-answer); HBPO's budget per row from a row function, correctness from the reward
    "brpo": dict(field_producers={"cut_lens": lambda b: torch.tensor([[2, 4, 8]] * b.B),
                                  "cut_scores": lambda b: b.rewards.float()[:, None] * torch.tensor([0.25, 0.5, 1.0])}),
    "vsrm": dict(field_producers={"cut_lens": lambda b: torch.tensor([[0, 2, 4]] * b.B),
                                  "cut_scores": lambda b: b.rewards.float()[:, None] * torch.tensor([0.0, 0.5, 1.0])}),
    "hbpo": dict(row_fields={"think_budget": lambda completion_ids, **kw: [4 + 4 * (i % 2)
                                                                         for i in range(len(completion_ids))]},
                 field_producers={"correct": lambda b: b.rewards >= b.rewards.median()},
                 estimator_kwargs={"l_max": 16}),
}
ESTIMATORS = [n for n in list_estimators() if not n.startswith("_")]


@pytest.fixture(scope="module")
def tok():
    return w.tokenizer()


@pytest.fixture(scope="module")
def data():
    return Dataset.from_dict({"prompt": ["a b =", "c d ="] * 4, "level": list(range(8))})


def make_args(tmp_path, **overrides) -> GRPOConfig:
    args = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=B, num_generations=G,
                max_completion_length=10, max_steps=1, learning_rate=1e-2, logging_steps=1, report_to="none",
                save_strategy="no", beta=0.0, seed=0, bf16=False, fp16=False, dataloader_num_workers=0,
                disable_tqdm=True)
    return GRPOConfig(**{**args, **overrides})


def trainer_for(tmp_path, tok, data, reward=w.reward, args=None, **kwargs) -> CreditGRPOTrainer:
    """A trainer whose estimator calls are recorded in `trainer.calls` as (batch, advantages)."""
    return w.record_estimator_calls(CreditGRPOTrainer(
        model=w.model(tok), reward_funcs=reward, args=args or make_args(tmp_path), train_dataset=data,
        processing_class=tok, rollout_func=rollout, **kwargs))


def trl_advantages(monkeypatch) -> list:
    seen = []
    original = GRPOTrainer._generate_and_score_completions

    def spy(self, inputs):
        out = original(self, inputs)
        seen.append({"trl": out["advantages"].clone()})
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", spy)
    return seen


def outputs(trainer) -> list:
    seen = []
    inner = trainer._generate_and_score_completions

    def record(inputs):
        out = inner(inputs)
        seen.append({k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)})
        return out

    trainer._generate_and_score_completions = record
    return seen


# ---------------------------------------------------------------- every estimator
@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_estimator_runs_from_trl(tmp_path, tok, data, name):
    spec = get_spec(name)
    source = SOURCES.get(name, {})
    trainer = trainer_for(tmp_path, tok, data, estimator=name, **(source(tok) if callable(source) else source))
    out = outputs(trainer)
    trainer.train()
    (batch, advantages), = trainer.calls
    assert all(getattr(batch, f) is not None for f in spec.needs), name
    adv = out[0]["advantages"]
    mask = out[0]["completion_mask"].bool()
    assert adv.shape == out[0]["completion_ids"].shape
    torch.testing.assert_close(adv, advantages[:, : adv.shape[1]].float())
    assert bool(torch.isfinite(adv).all()) and bool((adv[~mask] == 0).all())
    assert float(adv.abs().sum()) > 0, f"{name}: all advantages are 0"
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("name", [n for n in ESTIMATORS if unsupported_fields(get_spec(n).needs)])
def test_estimator_without_its_source_is_refused_with_the_way(tok, name):
    missing = [f for f in unsupported_fields(get_spec(name).needs) if f in FIELD_HOW]
    option = FIELD_HOW[missing[0]].split("=")[0] if missing else "field_producers"
    with pytest.raises(ValueError, match=rf"{name}.*{option}"):
        CreditGRPOTrainer(model=w.model(tok), reward_funcs=w.reward, estimator=name)


def test_step_signals_are_the_splitter_and_the_step_functions(tmp_path, tok, data):
    trainer = trainer_for(tmp_path, tok, data, estimator="sum_form", step_reward_funcs=[w.step_reward, w.step_reward],
                          step_reward_weights=[1.0, 0.5], step_split=SPLIT)
    trainer.train()
    (batch, _), = trainer.calls
    from types import SimpleNamespace

    seg = SPLIT.segment(batch, SimpleNamespace(policy=SimpleNamespace(tokenizer=tok), scores=()))
    steps = [seg.step_texts(b) for b in range(batch.B)]
    assert max(len(s) for s in steps) >= 2
    torch.testing.assert_close(batch.step_ids, seg.step_ids)
    expected = 1.5 * pad_step_values(w.step_reward(None, None, steps, None), seg.num_steps)  # weights 1 + 0.5
    torch.testing.assert_close(batch.step_rewards, expected)


def test_planning_mask_and_strata_sources(tmp_path, tok, data):
    trainer = trainer_for(tmp_path, tok, data, estimator="hicra", planning_grams=["a b"])
    trainer.train()
    (batch, _), = trainer.calls
    words = [tok.convert_ids_to_tokens(row) for row in batch.response_ids.tolist()]
    expected = torch.zeros_like(batch.planning_mask)  # the tokens of every "a" "b" pair
    for b, row in enumerate(words):
        for t in range(len(row) - 1):
            if row[t:t + 2] == ["a", "b"]:
                expected[b, t:t + 2] = True
    assert int(expected.sum()) >= B * 2
    torch.testing.assert_close(batch.planning_mask, expected)
    trainer = trainer_for(tmp_path, tok, data, estimator="stratified",
                          row_fields={"strata": lambda completions, level, **kw: [len(c.split()) + x
                                                                                  for c, x in zip(completions, level)]})
    trainer.train()
    (batch, _), = trainer.calls
    texts = tok.batch_decode(batch.response_ids, skip_special_tokens=True)
    levels = trainer._rows.columns["level"]  # the dataset column of each row, as TRL handed it over
    assert batch.strata.tolist() == [len(t.split()) + x for t, x in zip(texts, levels)]
    assert len(set(levels)) == 2


def test_implicit_prm_is_a_trained_copy_of_the_policy_and_checkpointed(tmp_path, tok, data):
    from creditlab.integrations.trl import load_prm_state, prm_state
    from creditlab.rollout.hf import sequence_logprobs

    trainer = trainer_for(tmp_path, tok, data, estimator="prime", implicit_prm={"lr": 1e-2})
    policy = w.model(tok)  # the policy's initial weights: the PRM and its reference start as copies
    trainer.train()
    (batch, _), = trainer.calls
    logp, _ = sequence_logprobs(policy, batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask,
                                share_prompts=False)
    torch.testing.assert_close(batch.prm_logprobs, logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.ref_logprobs, logp, atol=1e-5, rtol=1e-5)
    prm = trainer._prm
    assert any(not torch.equal(a, b) for a, b in zip(prm.prm.parameters(), prm.ref.parameters())), "not updated"
    state = prm_state(prm)
    fresh = trainer_for(tmp_path, tok, data, estimator="prime", implicit_prm={"lr": 1e-2})
    load_prm_state(fresh._prm, state)
    for a, b in zip(fresh._prm.prm.parameters(), prm.prm.parameters()):
        assert torch.equal(a, b)
    assert fresh._prm.optim.state_dict()["state"].keys() == prm.optim.state_dict()["state"].keys()
    ckpt = tmp_path / "ckpt"
    trainer.args.output_dir = str(ckpt)
    trainer._save_checkpoint(trainer.model, None)
    fresh._load_from_checkpoint(str(ckpt / f"checkpoint-{trainer.state.global_step}"))
    for a, b in zip(fresh._prm.prm.parameters(), prm.prm.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- TRL semantics
def test_scale_rewards_none_is_honoured_by_grpo(tmp_path, tok, data, monkeypatch):
    seen = trl_advantages(monkeypatch)
    trainer = trainer_for(tmp_path, tok, data, args=make_args(tmp_path, scale_rewards="none"), estimator="grpo")
    out = outputs(trainer)
    trainer.train()
    assert trainer.estimator_kwargs == {"scale_by_std": False}
    expected = seen[0]["trl"].unsqueeze(1) * out[0]["completion_mask"]
    torch.testing.assert_close(out[0]["advantages"], expected.float(), atol=1e-5, rtol=1e-5)
    assert float(expected.abs().max()) > 0


@pytest.mark.parametrize(("scale", "estimator", "match"), [
    ("batch", "grpo", "scale_rewards='batch'.*reinforce_pp"),
    ("none", "tempo", "scale_rewards='none'.*scale_by_std"),
    (False, "rloo", "scale_rewards='none'.*dr_grpo"),
])
def test_scale_rewards_without_a_matching_option_is_refused(tmp_path, tok, scale, estimator, match):
    with pytest.raises(ValueError, match=match):
        CreditGRPOTrainer(model="/nonexistent/model", reward_funcs=w.reward, estimator=estimator,
                          args=make_args(tmp_path, scale_rewards=scale))


def test_scale_rewards_none_with_dr_grpo_and_conflicts(tmp_path, tok, data):
    t = trainer_for(tmp_path, tok, data, args=make_args(tmp_path, scale_rewards="none"), estimator="dr_grpo")
    assert t.estimator_kwargs == {}
    with pytest.raises(ValueError, match="contradicts"):
        CreditGRPOTrainer(model="/nonexistent/model", reward_funcs=w.reward, estimator="grpo",
                          estimator_kwargs={"scale_by_std": True}, args=make_args(tmp_path, scale_rewards="none"))


def reward_with_unscorable(completions, **kwargs):
    """None for every completion at an index = 1 (mod 4): one unscorable row per group."""
    return [None if i % 4 == 1 else v for i, v in enumerate(w.reward(completions))]


def test_unscorable_rows_match_trl_for_grpo(tmp_path, tok, data, monkeypatch):
    seen = trl_advantages(monkeypatch)
    trainer = trainer_for(tmp_path, tok, data, reward=reward_with_unscorable, estimator="grpo",
                          estimator_kwargs={"eps": 1e-4})
    out = outputs(trainer)
    trainer.train()
    expected = seen[0]["trl"].unsqueeze(1) * out[0]["completion_mask"]
    torch.testing.assert_close(out[0]["advantages"], expected.float(), atol=1e-5, rtol=1e-5)
    assert bool((out[0]["advantages"][1::4] == 0).all())


@pytest.mark.parametrize("name", ["tempo", "reinforce_pp", "sum_form"])
def test_unscorable_rows_get_zero_and_stay_out_of_the_estimator(tmp_path, tok, data, name):
    trainer = trainer_for(tmp_path, tok, data, reward=reward_with_unscorable, estimator=name,
                          **SOURCES.get(name, {}))
    out = outputs(trainer)
    trainer.train()
    (scored, advantages), = trainer.calls
    assert scored.B == B - B // 4  # the estimator never saw the unscorable rows
    adv = out[0]["advantages"]
    keep = torch.tensor([i % 4 != 1 for i in range(B)])
    assert bool((adv[~keep] == 0).all())
    torch.testing.assert_close(adv[keep], advantages[:, : adv.shape[1]].float())
    ids = out[0]["completion_ids"][keep]
    assert torch.equal(scored.response_ids[:, : ids.shape[1]], ids)


def test_infinite_reward_names_the_function_and_the_row(tmp_path, tok, data):
    def reward_inf(completions, **kwargs):
        return [math.inf if i == 5 else 1.0 for i in range(len(completions))]

    trainer = trainer_for(tmp_path, tok, data, reward=[w.reward, reward_inf], estimator="grpo")
    with pytest.raises(ValueError, match=r"reward function 'reward_inf' returned inf for completion 5 .*None"):
        trainer.train()


def test_estimator_kwargs_are_checked_before_the_model_loads(tmp_path):
    msg = r"estimator_kwargs: estimator 'tempo' has no hyper-parameter 'tdcoef'"
    with pytest.raises(ValueError, match=msg):
        CreditGRPOTrainer(model="/nonexistent/model", reward_funcs=w.reward, estimator="tempo",
                          estimator_kwargs={"tdcoef": 1.0})
    with pytest.raises(ValueError, match=r"estimator_kwargs: estimator 'grpo'.*singleton"):
        CreditGRPOTrainer(model="/nonexistent/model", reward_funcs=w.reward, estimator="grpo",
                          estimator_kwargs={"singleton": "bogus"})


def test_a_source_the_estimator_does_not_read_is_refused(tok):
    with pytest.raises(ValueError, match=r"step_reward_funcs, row_fields\['strata'\] given.*'grpo'"):
        CreditGRPOTrainer(model=w.model(tok), reward_funcs=w.reward, estimator="grpo", step_reward_funcs=w.step_reward,
                          row_fields={"strata": "level"})
    with pytest.raises(ValueError, match="row_fields keys"):
        CreditGRPOTrainer(model=w.model(tok), reward_funcs=w.reward, estimator="stratified",
                          row_fields={"values": "level"})
    assert set(FIELDS) >= set(FIELD_HOW)
