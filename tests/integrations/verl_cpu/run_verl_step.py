"""Run one real `python -m verl.trainer.main_ppo` step on the CPU with a tiny random model (test driver).

    python run_verl_step.py OUT ESTIMATOR TRAINER_MODE [extra hydra overrides...]

Writes OUT/model (a 2-layer random Llama and a word-level tokenizer with a chat template), OUT/train.parquet
(16 prompts), then starts main_ppo through the shims in this folder (VERL_USE_EXTERNAL_MODULES: a CPU platform,
an HF-generate rollout, probe trainer modes that save what verl stored to OUT/probe). Prints main_ppo's output;
exits with its return code. `overrides()` is the CPU recipe docs/integrations.md describes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[2] / "src"
WORDS = ["a", "b", "c", "d", "e", ";", "=", "add", "sub"]
MODULES = "creditlab_cpu_platform,creditlab_hf_rollout,creditlab_probe"


def write_model(folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # EOS about as likely as any word, so responses end at ragged lengths
        model.lm_head.weight[1].copy_(model.lm_head.weight[3:].mean(0))
    model.generation_config.eos_token_id = 1
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)


def write_data(path: Path) -> None:
    import pandas as pd

    prompts = [" ".join(WORDS[(i + k) % 5] for k in range(3)) + " =" for i in range(16)]
    rows = [{"data_source": "creditlab_toy", "prompt": [{"role": "user", "content": p}], "ability": "toy",
             "reward_model": {"style": "rule", "ground_truth": "a"}, "extra_info": {"index": i, "split": "train"}}
            for i, p in enumerate(prompts)]
    pd.DataFrame(rows).to_parquet(path)


def overrides(out: Path, estimator: str, mode: str) -> list[str]:
    """main_ppo overrides for one CPU step (the walls are in docs/integrations.md)."""
    data, model = out / "train.parquet", out / "model"
    return [
        f"algorithm.adv_estimator={estimator}", f"trainer.v1.trainer_mode={mode}",
        f"data.train_files={data}", f"data.val_files={data}", "data.train_batch_size=4",
        "data.max_prompt_length=16", "data.max_response_length=8", "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={model}", "actor_rollout_ref.model.use_remove_padding=False",
        "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "actor_rollout_ref.actor.strategy=fsdp2", "actor_rollout_ref.actor.fsdp_config.strategy=fsdp2",
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile=False",
        "actor_rollout_ref.actor.fsdp_config.dtype=float32", "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4", "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.rollout.name=hf", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.rollout.agent.num_workers=1",
        f"reward.custom_reward_function.path={HERE / 'creditlab_reward.py'}",
        "reward.custom_reward_function.name=compute_score", "reward.num_workers=1",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1", "trainer.total_training_steps=1",
        "trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.logger=[console]",
        f"trainer.default_local_dir={out / 'ckpt'}", "trainer.project_name=creditlab", "trainer.experiment_name=cpu",
        "ray_kwargs.ray_init.num_cpus=16", "+ray_kwargs.ray_init.num_gpus=1",
        "+ray_kwargs.ray_init.include_dashboard=False",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    ]


def env(out: Path, ray_tmp: str) -> dict[str, str]:
    path = os.pathsep.join([str(HERE), str(SRC), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "VERL_USE_EXTERNAL_MODULES": MODULES, "VERL_PLATFORM": "cpu",
            "VERL_ENGINE_DEVICE": "cuda", "CREDITLAB_PROBE_DIR": str(out / "probe"), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0", "HYDRA_FULL_ERROR": "1",
            "RAY_TMPDIR": ray_tmp}  # a short path of its own: Ray's socket paths must stay under 107 bytes


def main(out: Path, estimator: str, mode: str, extra: list[str], timeout: float = 420) -> int:
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "model" / "config.json").exists():
        write_model(out / "model")
    write_data(out / "train.parquet")
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", *overrides(out, estimator, mode), *extra]
    ray_tmp = tempfile.mkdtemp(prefix="crlray", dir="/tmp")
    try:
        proc = subprocess.run(cmd, env=env(out, ray_tmp), timeout=timeout, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=out)  # Hydra writes outputs/ into cwd
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    (out / "main_ppo.log").write_text(proc.stdout)
    print(proc.stdout[-20000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]))
