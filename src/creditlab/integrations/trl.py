"""TRL integration: `CreditGRPOTrainer`, a `trl.GRPOTrainer` whose advantages come from a creditlab estimator.

    from creditlab.integrations.trl import CreditGRPOTrainer
    trainer = CreditGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...,
                                estimator="tempo", estimator_kwargs={})

Pinned to trl==1.16.0 (`pip install "creditlab[trl]"`). TRL's loss accepts advantages of shape [B,T]; the
supported extension point is `_generate_and_score_completions`, whose output dict carries `prompt_ids`,
`prompt_mask`, `completion_ids`, `completion_mask`, `advantages` and optionally `old_per_token_logps`,
`ref_per_token_logps` and `tool_mask`. This subclass lets TRL generate and score as usual, then builds a
`RolloutBatch` over the *whole* generation batch (all processes), runs the estimator and replaces `advantages`
with this process's rows [b, T].

Mapping (TRL -> RolloutBatch):
    completion_ids                      -> response_ids   [B,T]
    completion_mask * tool_mask         -> response_mask  [B,T] (tool-output tokens get no credit)
    row index // num_generations        -> group_ids      [B]   (TRL's RepeatSampler repeats each prompt
                                                                  num_generations times, in order)
    sum_k weight_k * reward_k           -> rewards        [B]   (TRL's `sum_then_normalize` reward)
    prompt_ids / prompt_mask            -> prompt_ids / prompt_mask [B,P]
    ref_per_token_logps (beta != 0)     -> ref_logprobs
    extra no-grad forward of the policy -> logprobs, entropies, certainty, token_logits (only when needed)
    decoded completions                 -> texts

Cost: estimators that need `logprobs`, `entropies`, `certainty` or `token_logits` cost one extra no-grad forward
of the policy over prompt+completion per generation batch (about a third of a training step's forward+backward),
chunked by `per_device_train_batch_size`. `logprobs` reuses TRL's `old_per_token_logps` when TRL computed them.
Estimators needing any other field (step_rewards, mc_values, values, ...) are rejected at construction.

Groups may straddle processes (TRL spreads one prompt's generations over ranks), so every field is padded to a
common T and gathered before the estimator runs, and this rank's rows and columns are sliced back afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor
from trl import GRPOTrainer

from creditlab.batch import FIELDS, REQUIRED, RolloutBatch
from creditlab.registry import get_estimator, get_spec

__all__ = ["FIELD_SOURCES", "CreditGRPOTrainer", "unsupported_fields"]

# Optional RolloutBatch fields this trainer can fill, and from what.
FIELD_SOURCES: dict[str, str] = {
    "prompt_ids": "TRL's prompt_ids",
    "prompt_mask": "TRL's prompt_mask",
    "ref_logprobs": "TRL's ref_per_token_logps (needs beta != 0)",
    "logprobs": "TRL's old_per_token_logps, else one extra no-grad forward of the policy",
    "entropies": "one extra no-grad forward of the policy (logits / temperature)",
    "certainty": "one extra no-grad forward of the policy (raw logits)",
    "token_logits": "one extra no-grad forward of the policy (raw logits)",
    "texts": "the tokenizer's decode of completion_ids",
}
_FORWARD_FIELDS = ("logprobs", "entropies", "certainty", "token_logits")


def unsupported_fields(needs: tuple[str, ...]) -> list[str]:
    """Fields in `needs` that cannot be produced from TRL's generation output."""
    return [f for f in needs if f not in REQUIRED and f not in FIELD_SOURCES]


class CreditGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with per-token advantages [B,T] from the creditlab estimator `estimator`.

    Args (beyond GRPOTrainer's):
        estimator: name of a registered creditlab estimator (`creditlab list`).
        estimator_kwargs: its hyperparameters. For TRL-identical GRPO advantages use
            `estimator="grpo", estimator_kwargs={"eps": 1e-4}` (TRL's std is unbiased, as creditlab's default).

    TRL's own `scale_rewards` is not used for the advantages (the estimator defines normalization);
    `multi_objective_aggregation` must be `"sum_then_normalize"` (rewards are summed before the estimator).
    """

    def __init__(self, *args: Any, estimator: str = "tempo", estimator_kwargs: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        spec = get_spec(estimator)  # KeyError naming the registered estimators
        missing = unsupported_fields(spec.needs)
        if missing:
            details = "; ".join(f"RolloutBatch.{f} ({FIELDS[f].doc}; produced by {FIELDS[f].producer})"
                                for f in missing)
            raise ValueError(f"estimator {estimator!r} needs {details}, which CreditGRPOTrainer cannot build from "
                             f"TRL's generation output. Fields it can build: "
                             f"{list(REQUIRED) + sorted(FIELD_SOURCES)}")
        super().__init__(*args, **kwargs)
        if "ref_logprobs" in spec.needs and self.beta == 0.0:
            raise ValueError(f"estimator {estimator!r} needs RolloutBatch.ref_logprobs, which TRL computes only "
                             f"with a reference model: set GRPOConfig(beta=...) > 0")
        if self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError("CreditGRPOTrainer needs multi_objective_aggregation='sum_then_normalize' (the "
                             f"estimator sees one summed reward per completion), got "
                             f"{self.multi_objective_aggregation!r}")
        self.estimator_name = estimator
        self.estimator_kwargs = dict(estimator_kwargs or {})
        self._estimator = get_estimator(estimator)
        self._needs = spec.needs
        self._rewards_per_func: Tensor | None = None

    # ---- hooks into TRL ----
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        # TRL returns the rewards of every process's completions [N, F]; keep them for the estimator.
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        batch = self._rollout_batch(output, mode)  # all processes
        credit = self._estimator(batch, **self.estimator_kwargs)
        b, t = output["completion_ids"].shape
        rank = self.accelerator.process_index
        rows = slice(rank * b, (rank + 1) * b)  # the same process slice TRL uses
        advantages = credit.advantages[rows, :t]  # [b, T_local]
        output["advantages"] = advantages.to(torch.float32).contiguous()
        self._log_credit(credit, batch, mode)
        return output

    # ---- batch construction ----
    def _rollout_batch(self, output: dict[str, Any], mode: str) -> RolloutBatch:
        """The `RolloutBatch` of the whole generation batch (every process's rows, in TRL's order)."""
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        local: dict[str, Tensor] = {"response_ids": output["completion_ids"], "response_mask": mask.bool()}
        if "ref_logprobs" in self._needs:
            local["ref_logprobs"] = output["ref_per_token_logps"]
        forward = [f for f in _FORWARD_FIELDS if f in self._needs]
        if forward == ["logprobs"] and output.get("old_per_token_logps") is not None:
            local["logprobs"] = output["old_per_token_logps"]
        elif forward:
            local.update(self._policy_signals(output, forward))
        for name in ("logprobs", "entropies", "certainty", "token_logits", "ref_logprobs"):
            if name in local:  # padding must be finite 0 (RolloutBatch convention)
                local[name] = torch.where(local["response_mask"], local[name].float(), 0.0)
        fields = {k: self._gather_right_padded(v) for k, v in local.items()}
        if "prompt_ids" in self._needs or "prompt_mask" in self._needs:
            fields["prompt_ids"] = self._gather_left_padded(output["prompt_ids"], self._tokenizer.pad_token_id)
            fields["prompt_mask"] = self._gather_left_padded(output["prompt_mask"], 0).bool()
        if "texts" in self._needs:
            texts = self._tokenizer.batch_decode(output["completion_ids"], skip_special_tokens=True)
            fields["texts"] = gather_object(texts)
        n = fields["response_ids"].shape[0]
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval
        device = fields["response_ids"].device
        group_ids = torch.arange(n, device=device) // num_generations  # [B]
        rewards = self._summed_rewards(group_ids).to(device)
        return RolloutBatch(group_ids=group_ids, rewards=rewards, **fields)

    def _summed_rewards(self, group_ids: Tensor) -> Tensor:
        """TRL's reward (weighted sum over reward functions) [B]; unscorable rows get their group's mean.

        TRL excludes a completion whose every reward function returned None from the group baseline (NaN) and
        zeroes its advantage. A RolloutBatch reward must be finite, so such a row gets its group's mean reward
        instead: the group mean is unchanged (the std is not), and GRPO-like estimators give it ~0.
        """
        per_func = self._rewards_per_func
        if per_func is None:
            raise RuntimeError("TRL did not call _calculate_rewards before scoring (unsupported TRL version?)")
        weights = self.reward_weights.to(per_func.device)
        rewards = (per_func * weights.unsqueeze(0)).nansum(dim=1)  # [B]
        unscorable = torch.isnan(per_func).all(dim=1)
        if bool(unscorable.any()):
            scored = torch.where(unscorable, torch.nan, rewards)
            group = group_ids.to(per_func.device)
            n_groups = int(group.max()) + 1
            total = torch.zeros(n_groups, device=per_func.device).index_add_(0, group, scored.nan_to_num())
            count = torch.zeros(n_groups, device=per_func.device).index_add_(0, group, (~unscorable).float())
            mean = (total / count.clamp_min(1))[group]
            rewards = torch.where(unscorable, mean, rewards)
        return rewards.float()

    def _gather_right_padded(self, x: Tensor) -> Tensor:
        # Ranks may have different completion lengths: pad to a common T, then gather the rows.
        x = self.accelerator.pad_across_processes(x, dim=1, pad_index=0)
        return self.accelerator.gather(x)

    def _gather_left_padded(self, x: Tensor, pad: int) -> Tensor:
        x = self.accelerator.pad_across_processes(x, dim=1, pad_index=pad, pad_first=True)
        return self.accelerator.gather(x)

    @torch.no_grad()
    def _policy_signals(self, output: dict[str, Any], names: list[str]) -> dict[str, Tensor]:
        """One no-grad forward of the policy over prompt+completion: per-token signals [b, T] for `names`.

        logprobs and entropies use logits / temperature (the sampling distribution, as TRL's own logprobs);
        certainty (logsumexp - mean of the logits) and token_logits use the raw logits.
        """
        if any(k in output for k in ("pixel_values", "image_grid_thw", "num_images")):
            raise NotImplementedError(f"estimator {self.estimator_name!r} needs policy signals {names}; "
                                      "CreditGRPOTrainer computes them for text-only models")
        completion_ids = output["completion_ids"]
        input_ids = torch.cat([output["prompt_ids"], completion_ids], dim=1)  # [b, P+T]
        attention_mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
        t = completion_ids.shape[1]
        chunk = self.args.per_device_train_batch_size
        parts: dict[str, list[Tensor]] = {n: [] for n in names}
        for start in range(0, input_ids.shape[0], chunk):
            ids = input_ids[start:start + chunk]
            logits = self.model(input_ids=ids, attention_mask=attention_mask[start:start + chunk],
                                logits_to_keep=t + 1).logits[:, :-1].float()  # [c, T, V]
            sampled = completion_ids[start:start + chunk].unsqueeze(-1)  # [c, T, 1]
            if "logprobs" in names or "entropies" in names:
                logp = torch.log_softmax(logits / self.temperature, dim=-1)  # [c, T, V]
                if "logprobs" in names:
                    parts["logprobs"].append(logp.gather(-1, sampled).squeeze(-1))
                if "entropies" in names:
                    parts["entropies"].append(-(logp.exp() * logp).sum(-1))
            if "certainty" in names:
                parts["certainty"].append(torch.logsumexp(logits, dim=-1) - logits.mean(dim=-1))
            if "token_logits" in names:
                parts["token_logits"].append(logits.gather(-1, sampled).squeeze(-1))
        return {n: torch.cat(v, dim=0) for n, v in parts.items()}

    def _log_credit(self, credit: Any, batch: RolloutBatch, mode: str) -> None:
        for key, value in credit.metrics.items():
            self._metrics[mode][key if "/" in key else f"credit/{key}"].append(float(value))
        # TRL logs one GRPO advantage per completion for its completions table; log ours (token mean) instead.
        logged = self._logs["advantages"]
        n = min(batch.B, len(logged))
        for _ in range(n):
            logged.pop()
        m = batch.response_mask
        row_mean = (credit.advantages * m).sum(1) / m.sum(1).clamp_min(1)  # [B]
        logged.extend(row_mean[batch.B - n:].tolist())
