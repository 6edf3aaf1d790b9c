"""Typed configuration: one dataclass per concern, each field documented once. The CLI is generated from these.

Validation lives here, in one place: every section has a `validate()` that raises a one-line `ValueError` naming
the CLI option (`--steps must be >= 1, got -1`), and `TrainConfig.validate()` runs, for every section, the generic
checks of `check_fields` (each value has its annotated type, floats are finite) and then the section's own
`validate()`, then the checks that span sections and the names (task, estimator, scorer, policy, their keyword
JSON). `train()` and `sft()` call `validate()` before doing any work, so a bad option never leaves a half-made
run directory behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from creditlab.train.losses import AggMode, KLKind

STEP_SPLITS = ("auto", "task", "newline", "double_newline")


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
    device: str = "auto"  # where the policy, batches, estimator and update run: auto (cuda if present), cpu, cuda[:N]
    step_split: str = "auto"  # step_ids: auto (the task verifier's steps, else lines), task, newline, double_newline

    def validate(self) -> None:
        at_least(self, steps=1, train_pool=1)
        if self.step_split not in STEP_SPLITS:
            raise ValueError(f"--step-split must be one of {list(STEP_SPLITS)}, got {self.step_split!r}")
        from creditlab.train import checks

        checks.check_out_dir(self.out_dir, "--out-dir")
        checks.check_task(self.task, _json_dict(self.task_kwargs, "--task-kwargs"))
        checks.check_estimator(self.estimator, _json_dict(self.estimator_kwargs, "--estimator-kwargs"))
        checks.check_scorer(self.scorer, _json_dict(self.scorer_kwargs, "--scorer-kwargs"))
        checks.check_policy(self.policy, "--policy")


@dataclass
class RolloutConfig:
    prompts_per_step: int = 16  # prompts sampled per step
    group_size: int = 8  # responses per prompt (G)
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 64  # response length limit (T)
    bf16: bool | None = None  # sample under bf16 autocast (fp32 weights); unset: auto = native bf16 and 50M+ params

    def validate(self) -> None:
        at_least(self, prompts_per_step=1, group_size=1, max_new_tokens=1)
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0 (0 is greedy decoding: every response of a group would be "
                             f"the same), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # AdamW learning rate
    warmup_steps: int = 0  # linear learning-rate warmup over the first N RL steps (0: constant lr)
    weight_decay: float = 0.0
    ppo_epochs: int = 1  # passes over each batch
    minibatches: int = 1  # minibatches per pass (gradient steps per pass)
    micro_batch_rows: int = 0  # rows per forward/backward inside a minibatch, gradients accumulated (0: all at once)
    clip_low: float = 0.2  # PPO ratio clip below 1
    clip_high: float = 0.28  # PPO ratio clip above 1 (DAPO clip-higher; 0.2 for symmetric PPO)
    dual_clip: float | None = None  # dual-clip constant c > 1 for negative advantages (None: off)
    loss_agg: AggMode = "token-mean"  # loss aggregation mode
    norm_constant: float | None = None  # constant for seq-mean-token-sum-norm (default: max_new_tokens)
    kl_coef: float = 0.0  # KL-to-reference coefficient in the loss (0: no reference model is loaded)
    kl_kind: KLKind = "k3"  # KL estimator
    max_grad_norm: float = 1.0  # gradient clipping
    update_bf16: bool | None = None  # update fwd/bwd under bf16 autocast (fp32 weights, AdamW); unset: as --bf16 auto

    def validate(self) -> None:
        at_least(self, warmup_steps=0, ppo_epochs=1, minibatches=1, micro_batch_rows=0, lr=0.0, weight_decay=0.0,
                 clip_high=0.0, kl_coef=0.0)
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"--clip-low must be in [0, 1) (the ratio is clipped below at 1 - clip_low), "
                             f"got {self.clip_low}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"--dual-clip must be > 1 (or none), got {self.dual_clip}")
        if self.norm_constant is not None and self.norm_constant <= 0:
            raise ValueError(f"--norm-constant must be > 0 (or none), got {self.norm_constant}")
        if self.max_grad_norm <= 0:
            raise ValueError(f"--max-grad-norm must be > 0, got {self.max_grad_norm}")


@dataclass
class EvalConfig:
    eval_every: int = 10  # steps between held-out evaluations (and at start and end)
    eval_problems: int = 128  # held-out problems, greedy decoding (0: no held-out evaluation)

    def validate(self) -> None:
        at_least(self, eval_every=1, eval_problems=0)


@dataclass
class LogConfig:
    checkpoint_every: int = 10  # steps between atomic checkpoints (and at the end)
    tensorboard: bool = True  # also write TensorBoard scalars
    progress: bool = True  # progress bar on stderr
    sample_every: int = 5  # steps between dumps of sampled responses with advantages (for `creditlab inspect`)

    def validate(self) -> None:
        at_least(self, checkpoint_every=1, sample_every=0)


@dataclass
class AgentConfig:
    agent_max_turns: int = 6  # turn limit of a multi-turn episode (environment tasks; max_new_tokens caps each action)
    agent_invalid_penalty: float = 0.1  # reward of an invalid action (verl-agent's coefficient 0.1); 0 disables it
    agent_kv_reuse: bool = True  # append observations to the KV cache instead of re-prefilling every turn
    agent_max_stratum: int = 4  # Stratified GRPO: tool-call counts above this share one stratum
    agent_info_gain_chunk: int = 64  # IGPO: rows per forward pass of the answer-probability producer

    def validate(self) -> None:
        if self.agent_max_turns < 1:
            raise ValueError(f"--agent-max-turns must be >= 1, got {self.agent_max_turns}")
        if not self.agent_invalid_penalty >= 0:
            raise ValueError(f"--agent-invalid-penalty must be >= 0, got {self.agent_invalid_penalty}")
        if self.agent_max_stratum < 0:
            raise ValueError(f"--agent-max-stratum must be >= 0, got {self.agent_max_stratum}")
        if self.agent_info_gain_chunk < 1:
            raise ValueError(f"--agent-info-gain-chunk must be >= 1, got {self.agent_info_gain_chunk}")


@dataclass
class MCConfig:
    mc_samples: int = 9  # Monte-Carlo continuations per cut point (K) for spo_chain / vineppo (papers: 9 on GSM8K)
    mc_unfinished_penalty: float | None = 0.0  # reward of a continuation cut by the length limit (None: score it)
    mc_max_rows: int = 256  # continuation rows per batched forward (bounds memory; prefixes are never split)
    rollout: Literal["independent", "tree"] = "independent"  # G independent samples per prompt, or a segment tree
    tree_fanout: str = "2,2,2"  # children per node at each tree level; leaves per prompt = their product
    tree_segment_len: int = 16  # tokens per segment on every tree level but the last (which runs free)

    def validate(self) -> None:
        if self.mc_samples < 1:
            raise ValueError(f"--mc-samples must be >= 1, got {self.mc_samples}")
        if self.mc_max_rows < 1:
            raise ValueError(f"--mc-max-rows must be >= 1, got {self.mc_max_rows}")
        if self.rollout not in ("independent", "tree"):
            raise ValueError(f"--rollout must be 'independent' or 'tree', got {self.rollout!r}")
        if self.tree_segment_len < 1:
            raise ValueError(f"--tree-segment-len must be >= 1, got {self.tree_segment_len}")
        from creditlab.rollout.tree import parse_fanout

        parse_fanout(self.tree_fanout)


@dataclass
class CriticConfig:
    critic: str = ""  # value critic: "" none, "head" (value head on the policy's trunk) or "model:<policy>" (separate)
    critic_lr: float = 1e-4  # critic AdamW learning rate (the head alone with head; trunk and head with model:)
    critic_coef: float = 0.1  # head: weight of the value loss's gradient in the policy's trunk (0: a linear probe)
    critic_clip: float | None = 0.5  # value clip around the old values (verl cliprange_value); None: unclipped
    critic_epochs: int = 1  # passes of the critic over each batch (head: the joint step + epochs-1 head-only passes)
    critic_warmup: int = 0  # first steps that train only the critic, the policy not updated (verl critic_warmup)
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
        if self.critic_warmup < 0:
            raise ValueError(f"--critic-warmup must be >= 0, got {self.critic_warmup}")
        if self.critic_warmup and not self.critic:
            raise ValueError("--critic-warmup needs a critic (--critic head or --critic model:<policy>)")
        if self.critic_epochs < 1 or (self.critic_minibatches is not None and self.critic_minibatches < 1):
            raise ValueError(f"--critic-epochs and --critic-minibatches must be >= 1, got {self.critic_epochs}, "
                             f"{self.critic_minibatches}")
        if not 0 <= self.critic_gamma <= 1 or not 0 < self.critic_tau <= 1:
            raise ValueError(f"--critic-gamma must be in [0, 1] and --critic-tau in (0, 1], got {self.critic_gamma}, "
                             f"{self.critic_tau}")


@dataclass
class AttnConfig:
    attn_window: int = 10  # WAAD clipping window W (paper: 10)
    attn_horizon_lo: int = 10  # FAI horizon lower bound H_lo (paper: 10)
    attn_horizon_hi: int = 100  # FAI horizon upper bound H_hi (paper ICML text: 100; arXiv v1: 50)
    attn_head_frac: float = 0.3  # share of heads in the local and in the global set (paper example: 0.3)
    attn_layers: str = ""  # comma-separated layer indices ("" = five evenly spaced in [L/3, 2L/3], the paper's)
    attn_sink: int = 1  # leading positions dropped from the keys as attention sinks (0 = paper's raw maps)
    attn_chunk: int = 128  # response rows per attention-probability chunk (memory knob)
    attn_rows_per_pass: int = 8  # sequences per attention forward (memory knob)

    def layers(self) -> tuple[int, ...] | None:
        try:
            values = tuple(int(x) for x in self.attn_layers.replace(" ", "").split(",") if x)
        except ValueError:
            raise ValueError(f"--attn-layers must be comma-separated layer indices, got {self.attn_layers!r}") from None
        return values or None

    def validate(self) -> None:
        if self.attn_window < 1:
            raise ValueError(f"--attn-window must be >= 1, got {self.attn_window}")
        if not 0 <= self.attn_horizon_lo <= self.attn_horizon_hi:
            raise ValueError(f"--attn-horizon-lo/-hi need 0 <= lo <= hi, got {self.attn_horizon_lo}, "
                             f"{self.attn_horizon_hi}")
        if not 0.0 < self.attn_head_frac <= 0.5:
            raise ValueError(f"--attn-head-frac must be in (0, 0.5], got {self.attn_head_frac}")
        if self.attn_sink < 0 or self.attn_chunk < 1 or self.attn_rows_per_pass < 1:
            raise ValueError("--attn-sink must be >= 0, --attn-chunk and --attn-rows-per-pass >= 1")
        if any(i < 0 for i in self.layers() or ()):
            raise ValueError(f"--attn-layers must be non-negative, got {self.attn_layers!r}")


@dataclass
class BudgetConfig:
    budgets: str = ""  # token budgets, e.g. "64,128,256": anytime eval at each; brpo/hbpo budgets ("" = 4 splits)
    budget_answers: int = 4  # answers sampled after each cut (BRPO's A: 4)
    budget_answer_tokens: int = 16  # length limit of each sampled answer
    budget_cue: str = ""  # text appended after a cut ("" = the task's answer cue)
    budget_cuts: Literal["auto", "budgets", "steps"] = "auto"  # where to cut (auto: steps for vsrm, else budgets)
    budget_step_split: str = "markers"  # step rule for step cuts: markers (VSRM), newline, double_newline, task
    budget_summary_loss: bool = True  # brpo: also train the sampled answer tokens (the reference does)
    budget_prefix: str = "I will answer the question with {budget} tokens.\n"  # hbpo prompt suffix per budget
    budget_eval: bool = True  # log eval/acc@<budget> and eval/anytime_auc when budgets are known

    def budget_list(self) -> list[int]:
        from creditlab.signals.budget import parse_budgets

        return parse_budgets(self.budgets)

    def validate(self) -> None:
        self.budget_list()
        if self.budget_answers < 1 or self.budget_answer_tokens < 1:
            raise ValueError(f"--budget-answers and --budget-answer-tokens must be >= 1, got {self.budget_answers}, "
                             f"{self.budget_answer_tokens}")
        if self.budget_step_split not in ("markers", "newline", "double_newline", "task"):
            raise ValueError(f"--budget-step-split must be markers, newline, double_newline or task, got "
                             f"{self.budget_step_split!r}")
        if "{budget}" not in self.budget_prefix:
            raise ValueError(f"--budget-prefix must contain '{{budget}}', got {self.budget_prefix!r}")


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    mc: MCConfig = field(default_factory=MCConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    attn: AttnConfig = field(default_factory=AttnConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Every section's generic and own checks, then the checks across sections (see the module docstring)."""
        for s in _sections(type(self)):
            section = getattr(self, s.name)
            check_fields(section)
            validate = getattr(section, "validate", None)
            if callable(validate):
                validate()
        batch = self.rollout.prompts_per_step * self.rollout.group_size
        if self.optim.minibatches > batch:
            raise ValueError(f"--minibatches must be <= the batch (--prompts-per-step x --group-size = {batch}), "
                             f"got {self.optim.minibatches}")

    def resume_differences(self, saved: dict[str, Any]) -> list[str]:
        """The options in which this config differs from `saved` (a run's config.json), ignoring those a resumed
        run may change (`RESUME_MAY_DIFFER`); each entry reads `--flag: saved -> now`."""
        now, default = _flatten(self.to_dict()), _flatten(TrainConfig().to_dict())
        old = _flatten(saved)
        out = []
        for key in sorted(set(now) | set(old)):
            if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUME_MAY_DIFFER):
                continue
            a, b = old.get(key, default.get(key, "<absent>")), now.get(key, "<absent>")
            if _normalised(key, a) != _normalised(key, b):
                out.append(f"{flag_of(key.split('.')[-1])}: {a!r} -> {b!r}")
        return out

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
    max_new_tokens: int = 64  # generation limit for the final evaluation (per action for environment tasks)
    max_turns: int = 6  # environment tasks with a demonstrator: turn limit of its episodes and of the evaluation

    def task_kwargs_dict(self) -> dict[str, Any]:
        return _json_dict(self.task_kwargs, "--task-kwargs")

    def validate(self) -> None:
        check_fields(self)
        at_least(self, steps=1, batch_size=1, eval_problems=1, max_new_tokens=1, max_turns=1)
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        from creditlab.train import checks

        checks.check_task(self.task, self.task_kwargs_dict())
        checks.check_policy(self.policy, "--policy")
        checks.check_out_dir(self.out_dir, "--out-dir")


# Options a resumed run may change: its length, where it lives, and logging. Everything else must match the
# run's config.json (a section added later is compared too: a key the saved config lacks counts as its default).
RESUME_MAY_DIFFER = ("run.steps", "run.resume", "run.out_dir", "eval.eval_every", "log.")


def flag_of(name: str) -> str:
    """The CLI option of a config field: `top_p` -> `--top-p`."""
    return "--" + name.replace("_", "-")


def at_least(section: Any, **minimum: float) -> None:
    """`ValueError("--flag must be >= m, got v")` for the first field below its minimum."""
    for name, lo in minimum.items():
        value = getattr(section, name)
        if value < lo:
            raise ValueError(f"{flag_of(name)} must be >= {lo}, got {value}")


def check_fields(section: Any) -> None:
    """Generic checks from the annotations: each field holds its type (bool, int, float, str, a Literal's values,
    or None where Optional) and every float is finite. One-line ValueError naming the option."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, tp, flag = getattr(section, f.name), hints[f.name], flag_of(f.name)
        args = typing.get_args(tp)
        if type(None) in args:
            if value is None:
                continue
            tp = next(a for a in args if a is not type(None))
        if typing.get_origin(tp) is Literal:
            if value not in typing.get_args(tp):
                raise ValueError(f"{flag} must be one of {list(typing.get_args(tp))}, got {value!r}")
        elif tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{flag} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{flag} must be a finite number, got {value}")
        elif tp in (bool, int, str) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
            raise ValueError(f"{flag} must be {tp.__name__}, got {value!r}")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _normalised(key: str, value: Any) -> Any:
    """JSON-option strings compare by content ('{"a":1}' == '{"a": 1}')."""
    if key.endswith("_kwargs") and isinstance(value, str):
        try:
            return json.loads(value or "{}")
        except json.JSONDecodeError:
            return value
    return value


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
        if tp is bool or (type(None) in args and bool in args):  # bool | None: --x, --no-x, or unset (None)
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
