"""An HF-`generate` rollout backend for verl 0.9.1 (test shim), loaded with VERL_USE_EXTERNAL_MODULES.

verl 0.9.1 only registers vLLM/SGLang/TensorRT-LLM servers. Select this one with `actor_rollout_ref.rollout.name=hf`:
- `HFServer`, a Ray actor that runs `model.generate` on one prompt at a time and answers verl's `TokenOutput`;
- `HFReplica`, the `RolloutReplica` that starts it (registered with `RolloutReplicaRegistry` as "hf");
- `HFServerAdapter`, the in-worker adapter verl's hybrid worker builds (`get_rollout_class("hf", "async")`): its
  `update_weights` pushes the trainer's weights (verl's "naive" checkpoint engine) into the server.
Sampling is seeded per request from the prompt and request id, so runs are reproducible.
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import ray
import torch
from verl.workers.rollout import base as rollout_base
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutReplica, RolloutReplicaRegistry, TokenOutput
from verl.workers.rollout.utils import ensure_async_iterator

SERVER_NAME = "creditlab_hf_server_{}"


class HFServer:
    """One HF causal LM answering verl's token-in/token-out `generate` calls (CPU, float32)."""

    def __init__(self, config: Any, model_config: Any, replica_rank: int) -> None:
        from transformers import AutoModelForCausalLM

        path = model_config.get("local_path", None) or model_config.path  # a DictConfig here
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.max_new_tokens = int(config.response_length)
        self.eos = self.model.generation_config.eos_token_id
        self.pad = self.model.generation_config.pad_token_id or 0
        self.global_steps = 0  # the weights' version, which verl's staleness metrics read from every output

    @torch.no_grad()
    def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any],
                 image_data: Any = None, video_data: Any = None, **kwargs: Any) -> TokenOutput:
        temperature = float(sampling_params.get("temperature", 1.0))
        top_k = int(sampling_params.get("top_k", -1))
        torch.manual_seed(zlib.crc32(f"{request_id}:{prompt_ids}".encode()))
        out = self.model.generate(
            input_ids=torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=temperature > 0, temperature=max(temperature, 1e-5),
            top_p=float(sampling_params.get("top_p", 1.0)), top_k=top_k if top_k > 0 else 0,
            max_new_tokens=int(sampling_params.get("max_tokens") or self.max_new_tokens),
            eos_token_id=self.eos, pad_token_id=self.pad)
        tokens = out[0, len(prompt_ids):].tolist()
        if self.eos in tokens:  # keep the EOS, drop generate's padding after it
            tokens = tokens[: tokens.index(self.eos) + 1]
        log_probs = self._log_probs(prompt_ids, tokens, temperature) if sampling_params.get("logprobs") else None
        return TokenOutput(token_ids=tokens, log_probs=log_probs, stop_reason="completed",
                           extra_fields={"global_steps": self.global_steps})

    def _log_probs(self, prompt_ids: list[int], tokens: list[int], temperature: float) -> list[float]:
        ids = torch.tensor([prompt_ids + tokens])
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float() / max(temperature, 1e-5)
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1).tolist()

    def update_weights(self, state: dict[str, torch.Tensor], global_steps: int | None = None) -> None:
        self.global_steps = global_steps if global_steps is not None else self.global_steps
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if missing or unexpected:  # names must match, or the rollout would keep stale weights in silence
            raise ValueError(f"weight names do not match the HF model: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    # verl's lifecycle calls; nothing to free on a CPU
    def wake_up(self) -> None: ...
    def sleep(self) -> None: ...
    def clear_kv_cache(self) -> None: ...
    def release_kv_cache(self) -> None: ...
    def resume_kv_cache(self) -> None: ...
    def resume_generation(self) -> None: ...
    def start_profile(self, **kwargs: Any) -> None: ...
    def stop_profile(self) -> None: ...
    def wait_for_requests_to_drain(self) -> None: ...

    def abort_all_requests(self, reject_request: bool = False) -> dict[str, Any]:
        return {"aborted_count": 0, "request_ids": []}


class HFReplica(RolloutReplica):
    """A replica of one `HFServer` actor (hybrid mode: it shares the trainer's resources, no GPU of its own)."""

    async def launch_servers(self) -> None:
        server = ray.remote(HFServer).options(name=SERVER_NAME.format(self.replica_rank), num_cpus=0,
                                              max_concurrency=self.max_concurrency).remote(
            config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"hf-replica-{self.replica_rank}"

    def rollout_worker_use_gpu(self) -> bool:
        return False


class HFServerAdapter(BaseRollout):
    """In the hybrid worker: hands the trainer's weights to the replica's `HFServer` (naive checkpoint engine)."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, replica_rank: int = -1, **kwargs: Any):
        super().__init__(config, model_config, device_mesh)
        self.replica_rank = replica_rank if replica_rank >= 0 else int(os.environ.get("RANK", "0"))
        self.is_leader_rank = True
        self.sleep_level = 2

    async def resume(self, tags: list[str]) -> None: ...
    async def release(self) -> None: ...

    async def update_weights(self, weights: Any, wire_format: str = "named_tensors", **kwargs: Any) -> None:
        state = {}
        async for name, tensor in ensure_async_iterator(weights):
            tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            state[name] = tensor.detach().to("cpu", torch.float32).clone()
        server = ray.get_actor(SERVER_NAME.format(self.replica_rank))
        await server.update_weights.remote(state, kwargs.get("global_steps"))


RolloutReplicaRegistry.register("hf", lambda: HFReplica)
rollout_base._ROLLOUT_REGISTRY[("hf", "async")] = f"{__name__}.HFServerAdapter"
