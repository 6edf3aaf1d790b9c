"""verl plugin: every creditlab estimator as a verl advantage estimator named `creditlab_<name>`.

Loaded by verl itself: `pyproject.toml` declares the entry point `creditlab = "creditlab.integrations.verl"` in the
`verl.plugins` group, which verl 0.9.1 imports at the end of `import verl` (driver and Ray actors alike). Select an
estimator with `algorithm.adv_estimator=creditlab_tempo`; hyperparameters go in `+algorithm.creditlab_kwargs={...}`.

What verl passes to an advantage estimator (`ray_trainer.compute_advantage`, generic branch):
`token_level_rewards [B,T]`, `response_mask [B,T]`, `index` (the `uid` of each row: responses to one prompt share
it), `config` (the `algorithm` config) and, for ReMax only, `reward_baselines`. The mapping to a `RolloutBatch`:
    token_level_rewards.sum(-1) -> rewards [B]          token_level_rewards -> token_rewards [B,T]
    index (uids, any hashable)  -> group_ids [B]         response_mask       -> response_mask [B,T]
    response_ids: verl does not pass token ids, so `response_ids` is a zero placeholder unless the trainer hook
    supplies the real ones (estimators that read them declare `needs=("response_ids",)`).

Trainer hook, for estimators that need more than verl passes (tempo needs `response_ids`, gae needs `values`,
sum_form needs step ids and step rewards): the fields come from the trainer's batch through `batch_fields(...)`,
a context manager the adv-estimator functions read (`verl_hook` documents every source and its configuration,
`+algorithm.creditlab_steps` for step signals from the reward function's extra info). Three ways to enter it:
  - v1 trainer (verl's default): `trainer.v1.trainer_mode=creditlab_sync`, a `PPOTrainerSync` subclass registered
    through verl's own `register_trainer`; it checks the configuration when it is constructed (before workers
    and models start: `verl_hook.check_config`) and reads the needed fields from TransferQueue around
    `_compute_advantage`. Registered at plugin load when verl's v1 trainer is importable (`verl[verl-core]`).
  - legacy `RayPPOTrainer` or a custom trainer: call `creditlab.integrations.verl.compute_advantage(data, ...,
    tokenizer=...)`, a drop-in for `verl.trainer.ppo.ray_trainer.compute_advantage`.
  - anything else: `with batch_fields(data, step_ids=..., ...): verl_compute_advantage(data, ...)`.
With verl's stock trainers an estimator whose needs the hook must supply fails at its first advantage
computation (verl has no start-time extension point for them); `creditlab_sync` fails at start.

verl swallows plugin import errors at DEBUG level, so this module checks itself: problems are logged at WARNING
and `check()` returns (or raises) them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from torch import Tensor

from creditlab.batch import FIELDS, RolloutBatch
from creditlab.integrations.verl_hook import (
    ALWAYS,
    HOOK_MADE,
    PREFIX,
    V1_FIELDS,
    HookConfig,
    check_config,
    estimator_kwargs,
    left_pad,
    signal_fields,
)
from creditlab.registry import get_spec, list_estimators

__all__ = ["DATAPROTO_FIELDS", "PREFIX", "V1_TRAINER_MODE", "batch_fields", "check", "check_config",
           "compute_advantage", "hook_fields", "register_all", "register_v1_trainer", "rollout_batch"]

logger = logging.getLogger(__name__)

V1_TRAINER_MODE = "creditlab_sync"
# RolloutBatch field <- DataProto.batch key (verl's names). Prompt fields come from `prompts` + `attention_mask`.
DATAPROTO_FIELDS: dict[str, str] = {
    "response_ids": "responses",
    "logprobs": "old_log_probs",
    "ref_logprobs": "ref_log_prob",
    "values": "values",
    "entropies": "entropys",
}  # legacy DataProto keys; the v1 trainer's TransferQueue keys are `verl_hook.V1_FIELDS`
_extra: ContextVar[dict[str, Tensor] | None] = ContextVar("creditlab_verl_fields", default=None)
_registered: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {}
_problems: list[str] = []


# ---------------------------------------------------------------- the adv-estimator functions
def rollout_batch(token_level_rewards: Tensor, response_mask: Tensor, index: Any,
                  extra: dict[str, Any] | None = None) -> RolloutBatch:
    """The `RolloutBatch` for verl's estimator arguments (+ fields from the trainer hook).

    Hook fields of shape [B,T] must match verl's response_mask and their floats are zeroed outside it; [B,S]
    step fields and [B] row fields are taken as they are (their padding is their own).
    """
    if index is None:
        raise ValueError("creditlab estimators need verl's `uid` (index) to group responses to one prompt; "
                         "the batch has no non_tensor_batch['uid']")
    mask = response_mask.bool()  # [B,T]
    _, inverse = np.unique(np.asarray(index, dtype=object).astype(str), return_inverse=True)
    group_ids = torch.as_tensor(inverse.reshape(-1), dtype=torch.long, device=mask.device)  # [B]
    token_rewards = torch.where(mask, token_level_rewards.float(), 0.0)  # [B,T]
    fields: dict[str, Any] = {"response_ids": torch.zeros_like(mask, dtype=torch.long)}  # placeholder
    for name, value in (extra or {}).items():
        spec = FIELDS[name]
        if spec.kind == "list":
            fields[name] = list(value)
            continue
        if value.shape[0] != mask.shape[0] or (spec.shape == ("B", "T") and tuple(value.shape) != tuple(mask.shape)):
            raise ValueError(f"trainer hook gave RolloutBatch.{name} of shape {tuple(value.shape)} "
                             f"[{','.join(spec.shape)}], but verl's response_mask has shape {tuple(mask.shape)} "
                             "(batch rows out of step?)")
        value = value.to(mask.device)
        if spec.shape == ("B", "T") and value.dtype.is_floating_point:
            value = torch.where(mask, value, torch.zeros((), dtype=value.dtype, device=mask.device))
        fields[name] = value
    return RolloutBatch(response_mask=mask, group_ids=group_ids, rewards=token_rewards.sum(-1),
                        token_rewards=token_rewards, **fields)


def _make_adv_fn(name: str) -> Callable[..., tuple[Tensor, Tensor]]:
    spec = get_spec(name)
    hookable = [f for f in spec.needs if f not in ALWAYS]

    def adv_fn(token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None,
               **_: Any) -> tuple[Tensor, Tensor]:
        extra = _extra.get()
        missing = [f for f in hookable if f not in (extra or {})]
        if missing:
            raise ValueError(_hook_error(name, missing, hooked=extra is not None))
        batch = rollout_batch(token_level_rewards, response_mask, index, extra)
        kwargs = estimator_kwargs(config)
        credit = spec.fn(batch, **kwargs)
        if "response_ids" not in (extra or {}):
            _check_ignores_token_ids(name, spec.fn, batch, kwargs, credit.advantages)
        advantages = credit.advantages.to(torch.float32)
        returns = advantages if credit.returns is None else credit.returns.to(torch.float32)
        return advantages, returns  # verl's GRPO also returns the advantages as returns

    adv_fn.__name__ = f"{PREFIX}{name}"
    adv_fn.__qualname__ = adv_fn.__name__
    adv_fn.__doc__ = f"creditlab estimator {name!r} as a verl advantage estimator. {spec.summary}"
    adv_fn.creditlab_estimator = name  # type: ignore[attr-defined]
    return adv_fn


def _hook_error(name: str, missing: list[str], hooked: bool = False) -> str:
    if hooked:  # inside batch_fields (creditlab_sync, compute_advantage or a custom trainer) but not supplied
        return (f"verl estimator '{PREFIX}{name}' needs RolloutBatch field(s) {missing}, which the trainer hook "
                f"did not supply: pass them to batch_fields(...) (custom trainers), or configure the creditlab_sync "
                f"hook (see creditlab.integrations.verl_hook; its check_config names what is missing)")
    return (f"verl estimator '{PREFIX}{name}' needs RolloutBatch field(s) {missing}, which verl does not pass to "
            f"advantage estimators. Supply them with the creditlab trainer hook: "
            f"trainer.v1.trainer_mode={V1_TRAINER_MODE} (v1 trainer; checks everything at trainer start), "
            f"creditlab.integrations.verl.compute_advantage(data, ...) (legacy/custom trainers), or "
            f"`with creditlab.integrations.verl.batch_fields(data): ...`. DataProto keys read: {DATAPROTO_FIELDS}")


def _check_ignores_token_ids(name: str, fn: Callable[..., Any], batch: RolloutBatch, kwargs: dict[str, Any],
                             advantages: Tensor) -> None:
    """Guard against silently wrong credit when token ids are missing.

    `response_ids` is a required field, so estimators that read token ids (prefix trees: tempo, treepo, ...) need
    not list it in `needs`. Without the trainer hook the ids are a placeholder of zeros (every response one shared
    prefix); rerunning with all-distinct ids (no shared prefix) and getting a different answer proves the
    estimator reads them, and the call fails instead of returning credit computed from fake tokens.
    Costs one extra estimator call per step when the hook is not in use.
    """
    distinct = torch.arange(batch.B * batch.T, device=batch.response_mask.device).view(batch.B, batch.T) + 1
    other = fn(batch.replace(response_ids=distinct), **kwargs).advantages
    if not torch.allclose(other, advantages, atol=1e-6, rtol=1e-5):
        raise ValueError(_hook_error(name, ["response_ids"]) + f" ({name!r} reads the response token ids.)")


def register_all() -> list[str]:
    """Register every creditlab estimator with verl as `creditlab_<name>` (idempotent); returns the names.

    Call it again after registering estimators of your own with `creditlab.registry.estimator`.
    """
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

    names = []
    for name in list_estimators():
        verl_name = PREFIX + name
        fn = _registered.get(verl_name)
        if fn is None or ADV_ESTIMATOR_REGISTRY.get(verl_name) is not fn:
            fn = _registered.setdefault(verl_name, _make_adv_fn(name))
            register_adv_est(verl_name)(fn)
        names.append(verl_name)
    return names


# ---------------------------------------------------------------- the trainer hook
@contextlib.contextmanager
def batch_fields(data: Any = None, **fields: Any) -> Iterator[dict[str, Any]]:
    """Make RolloutBatch fields from a verl `DataProto` (and/or given as keywords) visible to the estimators.

    `data.batch` keys are read through `DATAPROTO_FIELDS`; `prompt_ids`/`prompt_mask` come from `prompts` and the
    prompt part of `attention_mask`. Keywords are RolloutBatch field names and win over `data`.
    """
    found: dict[str, Any] = {}
    if data is not None:
        tensors = data.batch
        keys = set(tensors.keys())
        for name, key in DATAPROTO_FIELDS.items():
            if key in keys:
                found[name] = tensors[key]
        if "prompts" in keys:
            prompts = tensors["prompts"]
            found["prompt_ids"] = prompts.long()
            if "attention_mask" in keys:
                found["prompt_mask"] = tensors["attention_mask"][:, : prompts.shape[1]].bool()
    unknown = [k for k in fields if k not in FIELDS]
    if unknown:
        raise ValueError(f"unknown RolloutBatch field(s) {unknown}")
    found.update(fields)
    token = _extra.set(found)
    try:
        yield found
    finally:
        _extra.reset(token)


def compute_advantage(data: Any, adv_estimator: Any, *args: Any, tokenizer: Any = None, **kwargs: Any) -> Any:
    """Drop-in for `verl.trainer.ppo.ray_trainer.compute_advantage` that also hands the estimator the batch's
    token ids and other fields (`batch_fields(data)`). Use it in a legacy `RayPPOTrainer` subclass or custom loop.

    Step signals, planning tokens, texts and per-row fields (`verl_hook.HOOK_MADE`) are made from `responses` and
    the reward function's extra info, which legacy trainers keep as `data.non_tensor_batch[key]`; they need the
    `tokenizer` and the algorithm config (`config=`, read for `creditlab_steps` and friends).
    """
    from verl.trainer.ppo.ray_trainer import compute_advantage as verl_compute_advantage

    made = _made_fields(data, str(adv_estimator), tokenizer, kwargs.get("config"))
    with batch_fields(data, **made):
        return verl_compute_advantage(data, adv_estimator, *args, **kwargs)


def _made_fields(data: Any, adv_estimator: str, tokenizer: Any, config: Any) -> dict[str, Any]:
    if not adv_estimator.startswith(PREFIX) or adv_estimator[len(PREFIX):] not in list_estimators():
        return {}
    names = set(get_spec(adv_estimator[len(PREFIX):]).needs) & set(HOOK_MADE) - {"prompt_ids", "prompt_mask"}
    if not names:
        return {}
    if tokenizer is None:
        raise ValueError(f"{adv_estimator} needs {sorted(names)}, made from the decoded responses: pass "
                         "compute_advantage(..., tokenizer=<the trainer's tokenizer>)")
    response_mask = data.batch["response_mask"] if "response_mask" in data.batch.keys() else None
    if response_mask is None:
        raise ValueError("the DataProto has no response_mask")
    extra = data.non_tensor_batch
    infos = [{k: v[b] for k, v in extra.items()} for b in range(len(response_mask))]
    return signal_fields(names, data.batch["responses"], response_mask, tokenizer, HookConfig.from_algorithm(config),
                         infos)


def _row_info(x: Any) -> dict[str, Any]:
    """A row's extra info in the v1 trainer: the agent loop's extra_fields with its reward_extra_info on top."""
    if not isinstance(x, dict):
        return {}
    info = x.get("reward_extra_info", {})
    return {**{k: v for k, v in x.items() if k != "reward_extra_info"}, **(info if isinstance(info, dict) else {})}


def register_v1_trainer(mode: str = V1_TRAINER_MODE) -> type:
    """Register (via verl's `register_trainer`) a `PPOTrainerSync` subclass that feeds the trainer hook.

    It reads the fields the configured `creditlab_*` estimator needs from TransferQueue (same keys, same row order
    as verl's own `_compute_advantage`) and runs verl's `_compute_advantage` inside `batch_fields(...)`.
    Needs `verl[verl-core]` (TransferQueue). Select it with `trainer.v1.trainer_mode=creditlab_sync`.
    """
    import transfer_queue as tq
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
    from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

    if mode in TRAINER_REGISTRY and getattr(TRAINER_REGISTRY[mode], "creditlab_hook", False):
        return TRAINER_REGISTRY[mode]

    class CreditlabPPOTrainerSync(PPOTrainerSync):
        """verl's synchronous PPO trainer whose advantage step supplies creditlab estimators' extra fields."""

        creditlab_hook = True

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            check_config(config)  # before any worker, model or dataset is started
            super().__init__(config, *args, **kwargs)

        def _compute_advantage(self, batch: Any, metrics: dict) -> Any:
            name = str(self.config.algorithm.adv_estimator)
            if not name.startswith(PREFIX):
                return super()._compute_advantage(batch, metrics)
            fields = hook_fields(tq, batch, set(get_spec(name[len(PREFIX):]).needs), self.tokenizer,
                                 HookConfig.from_algorithm(self.config.algorithm))
            if not fields:
                return super()._compute_advantage(batch, metrics)
            with batch_fields(**fields):
                return super()._compute_advantage(batch, metrics)

    return register_trainer(mode)(CreditlabPPOTrainerSync)


def hook_fields(tq: Any, batch: Any, needs: set[str], tokenizer: Any, hook: HookConfig) -> dict[str, Any]:
    """The fields in `needs` read from TransferQueue for one v1 batch (same keys and row order as verl's own
    `_compute_advantage`; ragged rows padded to the longest response, as verl pads)."""
    read = {f: V1_FIELDS[f] for f in needs if f in V1_FIELDS}
    made = needs & set(HOOK_MADE)
    select = set(read.values()) | ({"responses", "response_mask"} if made else set())
    select |= {"extra_fields"} if made & {"step_rewards", "step_labels", *hook.row_fields} else set()
    select |= {"prompts"} if made & {"prompt_ids", "prompt_mask"} else set()
    if not select:
        return {}
    data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=sorted(select))

    def padded(key: str) -> Tensor:
        return data[key].to_padded_tensor(padding=0) if data[key].is_nested else data[key]

    fields: dict[str, Any] = {f: padded(k) for f, k in read.items()}  # [B, T]
    if made - {"prompt_ids", "prompt_mask"}:
        infos = None
        if "extra_fields" in select:  # each row's reward_extra_info; list() as verl normalizes non-tensor fields
            infos = [_row_info(x) for x in list(data["extra_fields"])]
        fields.update(signal_fields(made - {"prompt_ids", "prompt_mask"}, padded("responses").long(),
                                    padded("response_mask"), tokenizer, hook, infos))
    if "prompts" in select:
        prompts = data["prompts"]
        rows = list(prompts.unbind(0)) if prompts.is_nested else list(prompts)
        fields["prompt_ids"], fields["prompt_mask"] = left_pad(rows, getattr(tokenizer, "pad_token_id", 0) or 0)
    return {k: v for k, v in fields.items() if k in needs}


# ---------------------------------------------------------------- self-check
def check(raise_on_error: bool = False) -> list[str]:
    """Problems with the plugin (empty when healthy): every creditlab estimator must resolve through verl's
    `get_adv_estimator_fn` as `creditlab_<name>` to a creditlab function."""
    problems = list(_problems)
    try:
        from verl.trainer.ppo.core_algos import get_adv_estimator_fn

        for name in list_estimators():
            try:
                fn = get_adv_estimator_fn(PREFIX + name)
            except Exception as e:  # verl raises ValueError for unknown names
                problems.append(f"{PREFIX}{name} is not registered with verl: {e}")
                continue
            if getattr(fn, "creditlab_estimator", None) != name:
                problems.append(f"{PREFIX}{name} resolves to {fn!r}, not the creditlab estimator")
    except Exception as e:
        problems.append(f"verl.trainer.ppo.core_algos is not importable: {type(e).__name__}: {e}")
    if raise_on_error and problems:
        raise RuntimeError("creditlab verl plugin: " + "; ".join(problems))
    return problems


def _load() -> None:
    try:
        register_all()
    except Exception as e:
        _problems.append(f"registering estimators failed: {type(e).__name__}: {e}")
    if importlib.util.find_spec("transfer_queue") is not None:  # verl[verl-core]: the v1 trainer is usable
        try:
            register_v1_trainer()
        except Exception as e:
            _problems.append(f"registering trainer mode {V1_TRAINER_MODE!r} failed: {type(e).__name__}: {e}")
    for problem in check():
        logger.warning("creditlab verl plugin: %s", problem)


_load()
