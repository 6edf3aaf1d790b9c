"""Typed configuration: one dataclass per concern, each field documented once. The CLI is generated from these."""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from creditlab.train.losses import AggMode, KLKind


@dataclass
class RunConfig:
    task: str = "arith_chain"  # task name (creditlab list)
    policy: str = "tiny"  # "tiny", "smollm2" or a local HF model directory
    estimator: str = "grpo"  # registered estimator name (creditlab list)
    estimator_kwargs: str = "{}"  # JSON dict of estimator hyperparameters, e.g. '{"td_coef": 0.5}'
    task_kwargs: str = "{}"  # JSON dict of task options, e.g. '{"n_steps": 2}'
    scorer: str = ""  # step scorer filling step_rewards: oracle, prm, judge, implicit ("" = the task's oracle)
    scorer_kwargs: str = "{}"  # JSON dict of scorer options, e.g. '{"hackable": true}'
    out_dir: str = ""  # run directory (default runs/<task>-<estimator>-s<seed>)
    seed: int = 0  # seeds problems, sampling and minibatch order
    steps: int = 40  # RL steps (one batch of prompts each)
    resume: bool = False  # continue from out_dir's latest checkpoint
    train_pool: int = 4096  # number of training problems drawn from the task


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16  # prompts sampled per step
    group_size: int = 8  # responses per prompt (G)
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 64  # response length limit (T)
    bf16: bool = False  # sample under bf16 autocast (fp32 master weights); faster on CPU for 100M+ models


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW learning rate
    warmup_steps: int = 0  # linear learning-rate warmup over the first N RL steps (0: constant lr)
    weight_decay: float = 0.0
    ppo_epochs: int = 1  # passes over each batch
    minibatches: int = 1  # minibatches per pass (gradient steps per pass)
    clip_low: float = 0.2  # PPO ratio clip below 1
    clip_high: float = 0.28  # PPO ratio clip above 1 (DAPO clip-higher; 0.2 for symmetric PPO)
    dual_clip: float | None = None  # dual-clip constant c > 1 for negative advantages (None: off)
    loss_agg: AggMode = "token-mean"  # loss aggregation mode
    norm_constant: float | None = None  # constant for seq-mean-token-sum-norm (default: max_new_tokens)
    kl_coef: float = 0.0  # KL-to-reference coefficient in the loss (0: no reference model is loaded)
    kl_kind: KLKind = "k3"  # KL estimator
    max_grad_norm: float = 1.0  # gradient clipping
    update_bf16: bool = False  # update forward/backward under bf16 autocast (fp32 master weights and AdamW state)


@dataclass
class EvalConfig:
    eval_every: int = 10  # steps between held-out evaluations (and at start and end)
    eval_problems: int = 128  # held-out problems, greedy decoding


@dataclass
class LogConfig:
    checkpoint_every: int = 10  # steps between atomic checkpoints (and at the end)
    tensorboard: bool = True  # also write TensorBoard scalars
    progress: bool = True  # progress bar on stderr
    sample_every: int = 5  # steps between dumps of sampled responses with advantages (for `creditlab inspect`)


@dataclass
class CriticConfig:
    critic: str = ""  # value critic: "" none, "head" (value head on the policy's trunk) or "model:<policy>" (separate)
    critic_lr: float = 1e-4  # critic AdamW learning rate (the head alone with head; trunk and head with model:)
    critic_coef: float = 0.1  # head: weight of the value loss's gradient in the policy's trunk (0: a linear probe)
    critic_clip: float | None = 0.5  # value clip around the old values (verl cliprange_value); None: unclipped
    critic_epochs: int = 1  # model: passes of the critic over each batch
    critic_minibatches: int | None = None  # model: gradient steps per pass (None: the policy's --minibatches)
    critic_max_grad_norm: float = 1.0  # gradient clipping of the critic's own parameters
    critic_kl_in_reward: float = 0.0  # beta of a per-token KL reward (verl use_kl_in_reward, k1); 0: off
    critic_gamma: float = 0.95  # archer: TD discount of the turn-level critic (ArCHer's default)
    critic_tau: float = 0.1  # archer: soft update rate of the target critic (ArCHer's default)

    def validate(self) -> None:
        if self.critic not in ("", "head") and not (self.critic.startswith("model:") and self.critic[6:]):
            raise ValueError(f"--critic must be '', 'head' or 'model:<policy>', got {self.critic!r}")
        for flag, value in (("--critic-lr", self.critic_lr), ("--critic-max-grad-norm", self.critic_max_grad_norm)):
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}")
        if self.critic_coef < 0 or self.critic_kl_in_reward < 0:
            raise ValueError(f"--critic-coef and --critic-kl-in-reward must be >= 0, got {self.critic_coef}, "
                             f"{self.critic_kl_in_reward}")
        if self.critic_clip is not None and not self.critic_clip > 0:
            raise ValueError(f"--critic-clip must be > 0 or None, got {self.critic_clip}")
        if self.critic_epochs < 1 or (self.critic_minibatches is not None and self.critic_minibatches < 1):
            raise ValueError(f"--critic-epochs and --critic-minibatches must be >= 1, got {self.critic_epochs}, "
                             f"{self.critic_minibatches}")
        if not 0 <= self.critic_gamma <= 1 or not 0 < self.critic_tau <= 1:
            raise ValueError(f"--critic-gamma must be in [0, 1] and --critic-tau in (0, 1], got {self.critic_gamma}, "
                             f"{self.critic_tau}")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**{f.name: f.type_cls(**d.get(f.name, {})) for f in _sections(cls)})  # type: ignore[attr-defined]

    def estimator_kwargs(self) -> dict[str, Any]:
        return _json_dict(self.run.estimator_kwargs, "--estimator-kwargs")

    def task_kwargs(self) -> dict[str, Any]:
        return _json_dict(self.run.task_kwargs, "--task-kwargs")

    def scorer_kwargs(self) -> dict[str, Any]:
        return _json_dict(self.run.scorer_kwargs, "--scorer-kwargs")


@dataclass
class SFTConfig:
    task: str = "arith_chain"  # task whose demonstrations are imitated
    task_kwargs: str = "{}"  # JSON dict of task options
    policy: str = "tiny"  # policy to warm-start
    out_dir: str = "runs/sft-tiny"  # where the warm-started policy is saved (load it with --policy DIR)
    seed: int = 0
    steps: int = 300  # gradient steps
    batch_size: int = 32  # demonstrations per step
    lr: float = 3e-3  # AdamW learning rate (high: the tiny model starts from scratch)
    eval_problems: int = 128  # held-out problems for the greedy accuracy printed at the end
    max_new_tokens: int = 64  # generation limit for the final evaluation

    def task_kwargs_dict(self) -> dict[str, Any]:
        return _json_dict(self.task_kwargs, "--task-kwargs")


def _json_dict(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag} must be a JSON object, got {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


# ------------------------------------------------------------------ CLI generation from the dataclasses
@dataclass
class _Section:
    name: str
    type_cls: type


def _sections(cls: type) -> list[_Section]:
    hints = typing.get_type_hints(cls)
    return [_Section(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _field_comments(cls: type) -> dict[str, str]:
    import inspect

    out: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        if ":" in line and "#" in line and "=" in line:
            name = line.split(":")[0].strip()
            out[name] = line.split("#", 1)[1].strip()
    return out


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One `--flag` per field: type from the annotation, choices from Literal, help from the field comment."""
    hints = typing.get_type_hints(cls)
    helps = _field_comments(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        kw: dict[str, Any] = {"dest": prefix + f.name, "default": f.default, "help": helps.get(f.name, "")}
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kw.update(choices=list(args), type=type(args[0]))
        elif type(None) in args:  # Optional[X]
            inner = next(a for a in args if a is not type(None))
            kw["type"] = lambda s, _t=inner: None if s.lower() == "none" else _t(s)
        else:
            kw["type"] = tp
        group.add_argument(flag, **kw)


def dataclass_from_args(cls: type, ns: argparse.Namespace, prefix: str = "") -> Any:
    return cls(**{f.name: getattr(ns, prefix + f.name) for f in dataclasses.fields(cls)})


def add_train_args(parser: argparse.ArgumentParser) -> None:
    for s in _sections(TrainConfig):
        add_dataclass_args(parser, s.type_cls, prefix=f"{s.name}.")


def train_config_from_args(ns: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{s.name: dataclass_from_args(s.type_cls, ns, prefix=f"{s.name}.")
                          for s in _sections(TrainConfig)})
