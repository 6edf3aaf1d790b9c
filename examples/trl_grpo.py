"""Train with TRL's GRPO loop and creditlab credit: `CreditGRPOTrainer(estimator="tempo")`.

    pip install -e ".[trl]"            # trl==1.16.0 (own environment: `make test-trl` builds .venv-trl)
    python examples/trl_grpo.py                      # tiny random Llama built locally, runs on CPU in ~1 min
    python examples/trl_grpo.py --model /path/to/local/hf_model --estimator hicra_entropy --steps 50

The reward is the number of "a" tokens in the completion, a toy signal that a tiny model can learn.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig

from creditlab.integrations.trl import CreditGRPOTrainer


def tiny_policy(extra_words: list[str] | None = None):
    """A 2-layer Llama and a word-level tokenizer, built locally (nothing is downloaded)."""
    words = ["a", "b", "c", "d", "e", "f", "add", "sub", "=", *(extra_words or [])]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config), tokenizer


def count_a(completions, **kwargs):
    return [float(c.split().count("a")) for c in completions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="local HF model directory (default: tiny random Llama)")
    parser.add_argument("--estimator", default="tempo", help="any name from `creditlab list`")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        model, tokenizer = tiny_policy()
    dataset = Dataset.from_dict({"prompt": ["a b = ", "c add d = ", "e sub f = ", "b b = "] * 8})
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="creditlab-trl-"), max_steps=args.steps,
                        use_cpu=not torch.cuda.is_available(),
                        per_device_train_batch_size=8, num_generations=4, max_completion_length=12,
                        learning_rate=1e-3, beta=0.0, logging_steps=1, report_to="none", save_strategy="no")
    trainer = CreditGRPOTrainer(model=model, reward_funcs=count_a, args=config, train_dataset=dataset,
                                processing_class=tokenizer, estimator=args.estimator)
    trainer.train()


if __name__ == "__main__":
    main()
