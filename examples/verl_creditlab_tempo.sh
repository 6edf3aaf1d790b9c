#!/usr/bin/env bash
# verl 0.9.1 PPO/GRPO-style training with creditlab's TEMPO credit (needs GPUs, vLLM or SGLang: verl[vllm]).
#
#   pip install "verl[vllm]==0.9.1" -e ".[verl]"   # the verl.plugins entry point is what loads creditlab
#   bash examples/verl_creditlab_tempo.sh
#
# - algorithm.adv_estimator=creditlab_<name> picks any creditlab estimator (`creditlab list`).
# - trainer.v1.trainer_mode=creditlab_sync is the trainer hook: verl's synchronous v1 trainer, plus the response
#   token ids (and values/old_log_probs/... when the estimator needs them) handed to the estimator. Estimators that
#   only need rewards and groups (grpo, rloo, dr_grpo, reinforce_pp, ...) work with the stock trainer_mode=sync.
# - +algorithm.creditlab_kwargs={...} passes hyperparameters to the estimator (checked when the creditlab_sync
#   trainer starts, with every field the estimator needs).
# - process-reward estimators (creditlab_sum_form, creditlab_pure, creditlab_capo, creditlab_tp_grpo): have the
#   reward function return {"score": R, "step_rewards": [one per step]} and add
#   +algorithm.creditlab_steps='{split: newline, rewards_key: step_rewards}' (docs/integrations.md).
# - try the whole path on a CPU first: tests/integrations/verl_cpu/run_verl_step.py (docs/integrations.md).
# - verl swallows plugin import errors; check the plugin with:
#     python -c "import verl, creditlab.integrations.verl as p; p.check(raise_on_error=True)"
set -euo pipefail

MODEL=${MODEL:-$HOME/models/Qwen2.5-0.5B-Instruct}   # a local path
DATA=${DATA:-$HOME/data/gsm8k}                       # verl's parquet format (examples/data_preprocess/gsm8k.py)

python3 -c "import verl, creditlab.integrations.verl as p; p.check(raise_on_error=True)"

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=creditlab_tempo \
    +algorithm.creditlab_kwargs='{}' \
    trainer.v1.trainer_mode=creditlab_sync \
    data.train_files="$DATA/train.parquet" \
    data.val_files="$DATA/test.parquet" \
    data.train_batch_size=64 \
    data.max_prompt_length=512 \
    data.max_response_length=512 \
    actor_rollout_ref.model.path="$MODEL" \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=32 \
    actor_rollout_ref.actor.use_kl_loss=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.n=8 \
    trainer.n_gpus_per_node=1 \
    trainer.nnodes=1 \
    trainer.total_epochs=1 \
    trainer.logger='["console"]' \
    "$@"
