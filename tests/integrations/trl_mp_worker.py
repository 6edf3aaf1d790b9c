"""One process of the multi-process CreditGRPOTrainer test: `torchrun --nproc_per_node 2 trl_mp_worker.py OUT`.

Every process trains one step per configuration with a deterministic rollout function whose completions are
2-4 tokens long on process 0 and 6-8 tokens on process 1 (so `pad_across_processes` pads on one process only),
and saves its local generation output to OUT/<config>_rank<r>.pt for the test to check against creditlab.
"""

from __future__ import annotations

import os
import sys

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from creditlab.integrations.trl import CreditGRPOTrainer

WORDS = ["a", "b", "c", "d", "e", ";", "="]
G = 4  # generations per prompt; 6 rows per process -> 12 rows, 3 groups, the middle one split over processes
PER_DEVICE = 6
SPLIT = r";"


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def model(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg)


def record_estimator_calls(trainer):
    """Wrap `trainer._estimator` so each call is kept in `trainer.calls` as (batch, advantages); returns trainer."""
    trainer.calls, inner = [], trainer._estimator

    def recorded(batch, **kw):
        credit = inner(batch, **kw)
        trainer.calls.append((batch, credit.advantages))
        return credit

    trainer._estimator = recorded
    return trainer


def completion_words(rank: int, j: int) -> list[str]:
    """Row j of process `rank`: shared prefix "a b", then a row-dependent tail; 2-4 or 6-8 words."""
    n = (2 + j % 3) if rank == 0 else (6 + j % 3)
    tail = [WORDS[(k * (j + 1) + rank) % 5] for k in range(8)]
    words = ["a", ";", *tail][: n - 1]
    return words


def rollout(prompts, trainer):
    """Deterministic completions (ending with EOS) whose lengths differ between processes."""
    rank = trainer.accelerator.process_index
    tok = trainer.processing_class
    prompt_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completion_ids = [tok(" ".join(completion_words(rank, j)), add_special_tokens=False)["input_ids"]
                      + [tok.eos_token_id] for j in range(len(prompts))]
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "logprobs": [[0.0] * len(c) for c in completion_ids]}


def reward(completions, **kwargs):
    return [float(c.split().count("a")) + 0.25 * len(c.split()) for c in completions]


def step_reward(prompts, completions, steps, completion_ids, **kwargs):
    """Per-step score: number of "b" and "c" words in the step minus 0.5."""
    return [[s.split().count("b") + s.split().count("c") - 0.5 for s in row] for row in steps]


CONFIGS = {
    "grpo": dict(estimator="grpo", estimator_kwargs={"eps": 1e-4}),
    "tempo": dict(estimator="tempo"),
    "sum_form": dict(estimator="sum_form", step_reward_funcs=step_reward, step_split=None),
    "stratified": dict(estimator="stratified", row_fields={"strata": "level"}),
}


def main(out: str, names: list[str]) -> None:
    from creditlab.signals.steps import Segmenter

    tok = tokenizer()
    data = Dataset.from_dict({"prompt": ["a b =", "c d =", "e a ="] * 4, "level": [0, 1, 1] * 4})
    for name in names:
        cfg = dict(CONFIGS[name])
        if "step_split" in cfg:
            cfg["step_split"] = Segmenter("regex", SPLIT)
        seen: list[dict] = []
        trl_adv: list[torch.Tensor] = []
        original = GRPOTrainer._generate_and_score_completions

        class Recording(CreditGRPOTrainer):
            def _generate_and_score_completions(self, inputs, seen=seen):
                out = super()._generate_and_score_completions(inputs)
                seen.append({k: v.detach().clone() for k, v in out.items() if isinstance(v, torch.Tensor)})
                seen[-1]["level"] = torch.tensor([x["level"] for x in inputs])  # this process's dataset column
                return out

        def spy(self, inputs, original=original, trl_adv=trl_adv):  # TRL's own advantages on this output
            out = original(self, inputs)
            trl_adv.append(out["advantages"].clone())
            return out

        GRPOTrainer._generate_and_score_completions = spy
        args = GRPOConfig(output_dir=os.path.join(out, f"run_{name}"), use_cpu=True,
                          per_device_train_batch_size=PER_DEVICE, num_generations=G, max_completion_length=10,
                          max_steps=1, learning_rate=1e-2, logging_steps=1, report_to="none", save_strategy="no",
                          beta=0.0, seed=0, bf16=False, fp16=False, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Recording(model=model(tok), reward_funcs=reward, args=args, train_dataset=data,
                            processing_class=tok, rollout_func=rollout, **cfg)
        trainer.train()
        GRPOTrainer._generate_and_score_completions = original
        rank = trainer.accelerator.process_index
        torch.save({**seen[0], "trl_advantages": trl_adv[0], "world_size": trainer.accelerator.num_processes},
                   os.path.join(out, f"{name}_rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(CONFIGS))
    # Tear the gloo group down before interpreter exit: left to the destructors, its threads can abort a rank with
    # "terminate called without an active exception" (SIGABRT) after the work is done, failing the launch.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
