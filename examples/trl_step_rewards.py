"""Process rewards in TRL: a step-reward function and creditlab's PURE min-form credit (`estimator="pure"`).

    pip install -e ".[trl]"                      # trl==1.16.0 (own environment: `make test-trl` builds .venv-trl)
    python examples/trl_step_rewards.py          # tiny random Llama built locally, CPU, ~30 s
    python examples/trl_step_rewards.py --estimator sum_form --steps 20

Completions are split into steps at ";" (`step_split`); the step-reward function is called like a TRL reward
function with one more argument, `steps` (each completion's step texts), and returns one score per step. Swap in
your PRM or judge there. The outcome reward counts "a" tokens.
"""

from __future__ import annotations

import argparse
import tempfile

from datasets import Dataset
from trl import GRPOConfig
from trl_grpo import tiny_policy

from creditlab.integrations.trl import CreditGRPOTrainer
from creditlab.signals.steps import Segmenter


def count_a(completions, **kwargs):
    return [float(c.split().count("a")) for c in completions]


def step_score(prompts, completions, steps, completion_ids, **kwargs):
    """+1 for a step that contains "a", -1 otherwise (a stand-in for a PRM's verdict per step)."""
    return [[1.0 if "a" in s.split() else -1.0 for s in row] for row in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--estimator", default="pure", help="sum_form, pure or capo")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    model, tokenizer = tiny_policy(extra_words=[";"])
    dataset = Dataset.from_dict({"prompt": ["a b = ", "c add d = ", "e sub f = ", "b b = "] * 8})
    config = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="creditlab-trl-"), max_steps=args.steps, use_cpu=True,
                        per_device_train_batch_size=8, num_generations=4, max_completion_length=12,
                        learning_rate=1e-3, beta=0.0, logging_steps=1, report_to="none", save_strategy="no")
    trainer = CreditGRPOTrainer(model=model, reward_funcs=count_a, args=config, train_dataset=dataset,
                                processing_class=tokenizer, estimator=args.estimator,
                                step_reward_funcs=step_score, step_split=Segmenter("regex", ";"))
    trainer.train()


if __name__ == "__main__":
    main()
