"""Trainer modes that record what verl stored after `_compute_advantage` (test shim, VERL_USE_EXTERNAL_MODULES).

`creditlab_sync_probe` (creditlab's hook trainer) and `sync_probe` (verl's stock synchronous trainer) read back,
for every step, the rows' responses, masks, rewards, uids and the advantages verl wrote to TransferQueue, and save
them to $CREDITLAB_PROBE_DIR/step<N>.pt. The creditlab probe also saves the step fields its hook builds from the
reward function's extra info on the same rows (split ";", key "step_rewards"), so the test can check that path on
what a real verl step stored.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transfer_queue as tq
from verl.trainer.ppo.v1.trainer_base import register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from creditlab.integrations.verl import V1_TRAINER_MODE, hook_fields, register_v1_trainer
from creditlab.integrations.verl_hook import HookConfig


def _record(trainer: Any, batch: Any, hook: bool) -> None:
    fields = ["responses", "response_mask", "advantages", "rm_scores", "uid"]
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)

    def padded(key: str) -> torch.Tensor:
        return data[key].to_padded_tensor(padding=0) if data[key].is_nested else data[key]

    out = {k: padded(k) for k in ("responses", "response_mask", "advantages", "rm_scores")}
    out["uid"] = [str(u) for u in list(data["uid"])]
    if hook:
        steps = HookConfig(split="regex", pattern=";", rewards_key="step_rewards")
        made = hook_fields(tq, batch, {"step_ids", "step_rewards"}, trainer.tokenizer, steps)
        out.update({k: v.cpu() for k, v in made.items()})
        out["texts"] = [trainer.tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True)
                        for r, m in zip(out["responses"], out["response_mask"])]
    folder = os.environ["CREDITLAB_PROBE_DIR"]
    os.makedirs(folder, exist_ok=True)
    torch.save(out, os.path.join(folder, f"step{trainer.global_steps}.pt"))


Hooked = register_v1_trainer(V1_TRAINER_MODE)


@register_trainer("creditlab_sync_probe")
class HookedProbe(Hooked):
    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        batch = super()._compute_advantage(batch, metrics)
        _record(self, batch, hook=True)
        return batch


@register_trainer("sync_probe")
class StockProbe(PPOTrainerSync):
    def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
        batch = super()._compute_advantage(batch, metrics)
        _record(self, batch, hook=False)
        return batch
