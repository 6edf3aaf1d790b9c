"""CreditGRPOTrainer against the real trl==1.16.0 on CPU (run in .venv-trl: `make test-trl`).

A tiny Llama and a word-level tokenizer are built locally; nothing is downloaded.
"""

from __future__ import annotations

import math
from typing import ClassVar

import pytest

trl = pytest.importorskip("trl", reason="trl is not installed (make test-trl builds .venv-trl)")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from creditlab.batch import Credit, RolloutBatch  # noqa: E402
from creditlab.credit.ops import broadcast  # noqa: E402
from creditlab.credit.outcome import group_advantage  # noqa: E402
from creditlab.integrations.trl import CreditGRPOTrainer, unsupported_fields  # noqa: E402
from creditlab.registry import estimator, get_spec, list_estimators  # noqa: E402

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h", "add", "sub", "="]
G = 4  # generations per prompt


@estimator("_test_entropy_credit", needs=("entropies", "certainty", "token_logits"))
def _entropy_credit(batch: RolloutBatch) -> Credit:
    """Test-only: GRPO advantage scaled per token by the policy's entropy (exercises the signal forward)."""
    a = group_advantage(batch.rewards, batch.group_ids)
    scale = 1.0 + batch.entropies + 0.0 * batch.certainty + 0.0 * batch.token_logits
    return Credit(advantages=(broadcast(a, batch.response_mask) * scale * batch.response_mask).float())


@estimator("_test_needs_steps", needs=("step_ids", "step_rewards"))
def _needs_steps(batch: RolloutBatch) -> Credit:
    """Test-only: needs fields TRL cannot produce."""
    return Credit(advantages=torch.zeros_like(batch.response_mask, dtype=torch.float32))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(path)
    return PreTrainedTokenizerFast.from_pretrained(path)


def tiny_model(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=None, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def reward_count_a(completions, **kwargs):
    """Reward: number of 'a' tokens in the completion (varies within a group under a random policy)."""
    return [float(c.split().count("a")) + 0.1 * len(c.split()) for c in completions]


def make_args(tmp_path, **overrides) -> GRPOConfig:
    args = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2 * G, num_generations=G,
                max_completion_length=8, max_steps=2, learning_rate=5e-2, logging_steps=1, report_to="none",
                save_strategy="no", beta=0.0, temperature=1.0, seed=0, bf16=False, fp16=False,
                dataloader_num_workers=0, disable_tqdm=True)
    args.update(overrides)
    return GRPOConfig(**args)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict({"prompt": ["a b = ", "c add d = ", "e sub f = ", "g h = "] * 4})


def recording(cls):
    """A subclass of `cls` that records every generation batch it hands to the loss."""

    class Recording(cls):
        outputs: ClassVar[list] = []

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            type(self).outputs.append({k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)})
            return out

    return Recording


def run(trainer):
    before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    changed = any(not torch.equal(before[k], v.detach()) for k, v in trainer.model.named_parameters())
    return losses, changed


def test_grpo_matches_trl_advantages(tmp_path, tokenizer, dataset, monkeypatch):
    trl_advantages = []
    original = GRPOTrainer._generate_and_score_completions

    def spy(self, inputs):  # what plain TRL computed on this very generation output
        out = original(self, inputs)
        trl_advantages.append(out["advantages"].clone())
        return out

    monkeypatch.setattr(GRPOTrainer, "_generate_and_score_completions", spy)
    cls = recording(CreditGRPOTrainer)
    trainer = cls(model=tiny_model(tokenizer), reward_funcs=reward_count_a, args=make_args(tmp_path),
                  train_dataset=dataset, processing_class=tokenizer,
                  estimator="grpo", estimator_kwargs={"eps": 1e-4})  # TRL: unbiased std + 1e-4
    losses, changed = run(trainer)
    assert len(cls.outputs) == len(trl_advantages) >= 2
    nonzero = 0
    for out, theirs in zip(cls.outputs, trl_advantages):
        mask = out["completion_mask"].bool()
        ours = out["advantages"]
        assert ours.shape == out["completion_ids"].shape  # [B, T]
        expected = theirs.unsqueeze(1).expand_as(ours) * mask
        torch.testing.assert_close(ours, expected.float(), atol=1e-5, rtol=1e-5)
        nonzero += int((theirs.abs() > 1e-6).sum())
    assert nonzero > 0, "every group had constant rewards: the comparison is vacuous"
    assert losses and all(math.isfinite(x) for x in losses)
    assert changed


def _token_level_estimator() -> str:
    """tempo when registered; else a registered estimator TRL can feed whose advantages vary within a row."""
    if "tempo" in list_estimators():
        return "tempo"
    torch.manual_seed(1)
    b, t = 8, 6
    probe = RolloutBatch(response_ids=torch.randint(3, 10, (b, t)), response_mask=torch.ones(b, t, dtype=torch.bool),
                         group_ids=torch.arange(b) // G, rewards=torch.rand(b),
                         entropies=torch.rand(b, t), certainty=torch.rand(b, t), token_logits=torch.rand(b, t),
                         logprobs=-torch.rand(b, t))
    for name in list_estimators():
        if name.startswith("_test") or unsupported_fields(get_spec(name).needs) or "texts" in get_spec(name).needs:
            continue
        try:
            adv = get_spec(name).fn(probe).advantages
        except Exception:
            continue
        if bool((adv.std(dim=1) > 1e-6).any()):
            return name
    return "_test_entropy_credit"


@pytest.mark.parametrize("name", sorted({_token_level_estimator(), "_test_entropy_credit"}))
def test_token_level_estimator_trains(tmp_path, tokenizer, dataset, name):
    cls = recording(CreditGRPOTrainer)
    trainer = cls(model=tiny_model(tokenizer), reward_funcs=reward_count_a, args=make_args(tmp_path),
                  train_dataset=dataset, processing_class=tokenizer, estimator=name)
    losses, changed = run(trainer)
    assert cls.outputs
    varies = False
    for out in cls.outputs:
        adv, mask = out["advantages"], out["completion_mask"].bool()
        assert adv.shape == out["completion_ids"].shape
        assert bool((adv[~mask] == 0).all())
        for row, m in zip(adv, mask):
            vals = row[m]
            varies |= vals.numel() > 1 and bool((vals.max() - vals.min()) > 1e-6)
    assert varies, f"{name}: advantages are constant along every row"
    assert losses and all(math.isfinite(x) for x in losses)
    assert changed


def test_unproducible_field_fails_at_construction(tokenizer):
    with pytest.raises(ValueError, match=r"step_rewards.*step_reward_funcs"):
        CreditGRPOTrainer(model=tiny_model(tokenizer), reward_funcs=reward_count_a, estimator="_test_needs_steps")
