"""creditlab vs TRL 1.16 GRPOTrainer: samples/s and held-out accuracy, same settings, one process, CPU.

    .venv-trl/bin/python benchmarks/vs_trl.py                       # SmolLM2-135M, one-digit chain_sum, 10 steps
    .venv-trl/bin/python benchmarks/vs_trl.py --steps 10 --out runs/vs_trl.json
    .venv-trl/bin/python benchmarks/vs_trl.py --precision fp32 --steps 3   # only the fp32 pair
    .venv-trl/bin/python benchmarks/vs_trl.py --tiny --steps 1      # smoke mode: tiny policy, tiny sizes (~30 s)
    .venv-trl/bin/python benchmarks/vs_trl.py --profile             # + cProfile of one creditlab step
    .venv-trl/bin/python benchmarks/vs_trl.py --steps 15 --eval-every 5   # + accuracy at steps 5 and 10

Needs TRL (run it from .venv-trl: `make .venv-trl/.installed`; creditlab is installed there editable).

What runs, in one Python process, for each precision pair (`--precision`: fp32 = both sides fp32; bf16 = TRL's
`bf16=True` mixed precision against creditlab's `--bf16 --update-bf16`, both bf16 autocast over fp32 master
weights and fp32 AdamW; default: both pairs where the device multiplies bf16 natively, else fp32 only):
  1. warm-up (untimed): one creditlab step and one TRL step, each on a throwaway copy of the policy (the first
     run after a machine boots is several times slower; this also warms torch's kernels for both sides);
  2. creditlab: `train(cfg)` (the `creditlab train` entry point) for `--steps` steps, GRPO, from the initial policy;
  3. TRL: `GRPOTrainer.train()` for `--steps` steps from a fresh copy of the same initial policy;
  4. held-out greedy accuracy of both trained policies with creditlab's `evaluate()` on the same problems (and,
     with `--eval-every N`, of both policies every N steps on the way: a learning curve for each side).
Each step's peak resident memory is measured on both sides the same way (`creditlab.bench.memory.PeakMemory`
around creditlab's `rl_step` and between TRL's `on_step_begin`/`on_step_end`), and the record names the CPU
(`lscpu` model, bf16 flags) it ran on.

Same settings on both sides: 8 prompts x 4 samples x 40 new tokens per step, temperature 1, top-p 1, AdamW with
the same constant learning rate (TRL's default linear decay is switched off), weight decay 0, grad-norm clip 1.0,
no KL (beta=0, no reference model), one gradient step per batch (creditlab ppo_epochs=1, minibatches=1; TRL
num_iterations=1, gradient_accumulation_steps=1), token-mean loss (TRL loss_type="dapo"), clip 0.2/0.28, GRPO
advantages (R - mean_g) / (std_g + 1e-4) with the unbiased std (TRL's formula; creditlab `grpo` with eps=1e-4),
fp32 weights and fp32 AdamW. Both see *the same prompts in the same order*: the TRL dataset is built from the
problems creditlab's trainer draws at each step, and TRL's shuffling is off. Reward = the task's scorer on the
completion text (1 if correct else 0). Prompts go through the same chat template (checked token for token).

Differences that are the point of the comparison (creditlab's defaults for speed and memory):
- creditlab runs each group's shared prompt through the model once, in the sampler's prefill and in the update's
  forward/backward (its KV cache is indexed out to the G responses; exact up to float reassociation);
- creditlab computes log-probs with a chunked LM head over the valid tokens only (no [B, T, V] logits);
- creditlab samples with its own KV-cached sampler; TRL generates with `model.generate`.
TRL's GRPOConfig defaults `gradient_checkpointing=True`; it is set to False here (neither side recomputes
activations) and can be restored with `--trl-gradient-checkpointing`. `--bf16/--no-bf16`, `--update-bf16/
--no-update-bf16` and `--trl-bf16` set a custom mix instead of the pairs.

Timing: creditlab's step time is its own `time/step` (rollout + scoring + credit + update; logging, evaluation and
checkpoints excluded). TRL's step time is wall time from `on_step_begin` to `on_step_end` (data fetch, generation,
scoring, forward/backward, clip, optimizer step; logging and evaluation excluded). samples/s = completions / summed
step time. Rollout time is creditlab's `time/rollout` and TRL's `_generate` (generation + decode).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import creditlab.train.loop as loop
from creditlab.bench.learning import environment
from creditlab.bench.memory import PeakMemory
from creditlab.device import describe, device_info, native_bf16, resolve_device
from creditlab.policy import Policy, load_policy
from creditlab.tasks import Problem, get_task
from creditlab.train.config import (
    EvalConfig,
    LogConfig,
    OptimConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
)

TASK = "chain_sum"
TASK_KWARGS = {"digits": 1, "terms": 2}  # the one-digit easy setting (SmolLM2 starts near 40 %)
GRPO_EPS = 1e-4  # TRL's advantage: (R - mean) / (std + 1e-4)


@dataclass
class Sizes:
    policy: str
    prompts: int  # prompts per step
    group: int  # samples per prompt
    max_new_tokens: int
    eval_problems: int
    train_pool: int


FULL = Sizes(policy="smollm2", prompts=8, group=4, max_new_tokens=40, eval_problems=128, train_pool=4096)
TINY = Sizes(policy="tiny", prompts=2, group=2, max_new_tokens=8, eval_problems=4, train_pool=64)


@dataclass(frozen=True)
class Pair:
    """One comparison's precision: creditlab's sampling and update autocast, TRL's `bf16`."""

    name: str
    bf16: bool
    update_bf16: bool
    trl_bf16: bool


PAIRS = {"fp32": Pair("fp32", False, False, False), "bf16": Pair("bf16", True, True, True)}


@dataclass
class Result:
    framework: str
    steps: int
    samples: int
    step_s: list[float]  # per step, timed
    rollout_s: list[float]  # per step: generation only
    update_s: list[float] = field(default_factory=list)  # per step: forward/backward/optimizer (creditlab only)
    reward_mean: list[float] = field(default_factory=list)  # per step, training samples
    final_accuracy: float = float("nan")
    initial_accuracy: float | None = None
    accuracy_at: dict[int, float] = field(default_factory=dict)  # step -> held-out accuracy (0 and the end included)
    wall_s: float = 0.0  # the whole train call: setup, evaluation, checkpoints included
    peak_mb: list[float] = field(default_factory=list)  # per step: peak resident memory (MiB)
    delta_mb: list[float] = field(default_factory=list)  # per step: peak minus resident memory at the step's start
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def samples_per_s(self) -> float:
        total = sum(self.step_s)
        return self.samples / total if total > 0 else float("nan")

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(samples_per_s=self.samples_per_s,
                 step_s_mean=statistics.fmean(self.step_s) if self.step_s else float("nan"),
                 step_s_median=statistics.median(self.step_s) if self.step_s else float("nan"),
                 rollout_s_mean=statistics.fmean(self.rollout_s) if self.rollout_s else float("nan"),
                 peak_mb_max=max(self.peak_mb, default=float("nan")),
                 delta_mb_max=max(self.delta_mb, default=float("nan")))
        return d


# ---------------------------------------------------------------------------------------------------- setup
def load(sizes: Sizes, seed: int) -> Policy:
    return load_policy(sizes.policy, seed=seed)


def train_config(args: argparse.Namespace, sizes: Sizes, pair: Pair, *, steps: int, out_dir: Path,
                 eval_problems: int) -> TrainConfig:
    eval_every = args.eval_every or 10**9  # 0 (default): only at the start and the end
    return TrainConfig(
        run=RunConfig(task=TASK, task_kwargs=json.dumps(TASK_KWARGS), policy=sizes.policy, estimator="grpo",
                      estimator_kwargs=json.dumps({"eps": GRPO_EPS}), out_dir=str(out_dir), seed=args.seed,
                      steps=steps, train_pool=sizes.train_pool, device=args.device),
        rollout=RolloutConfig(prompts_per_step=sizes.prompts, group_size=sizes.group, temperature=args.temperature,
                              top_p=1.0, max_new_tokens=sizes.max_new_tokens, bf16=pair.bf16),
        optim=OptimConfig(lr=args.lr, weight_decay=0.0, ppo_epochs=1, minibatches=1, clip_low=0.2, clip_high=0.28,
                          loss_agg="token-mean", kl_coef=0.0, max_grad_norm=1.0, update_bf16=pair.update_bf16),
        eval=EvalConfig(eval_every=eval_every, eval_problems=eval_problems),
        log=LogConfig(checkpoint_every=10**9, tensorboard=False, progress=False, sample_every=0),
    )


def step_problems(cfg: TrainConfig, pool: list[Problem], steps: int) -> list[list[Problem]]:
    """The problems creditlab's trainer draws at steps 1..steps (same generator and seed as `rl_step`)."""
    out = []
    for step in range(1, steps + 1):
        gen = torch.Generator().manual_seed(loop.step_seed(cfg.run.seed, step))
        idx = torch.randint(len(pool), (cfg.rollout.prompts_per_step,), generator=gen).tolist()
        out.append([pool[i] for i in idx])
    return out


# ---------------------------------------------------------------------------------------------------- creditlab
def run_creditlab(cfg: TrainConfig) -> Result:
    original, memory = loop.rl_step, []

    def measured(*a: Any, **k: Any) -> Any:  # each step's peak memory, measured as TRL's steps are
        with PeakMemory(cfg.run.device if cfg.run.device != "auto" else resolve_device()) as m:
            out = original(*a, **k)
        memory.append(m)
        return out

    loop.rl_step = measured
    t0 = time.perf_counter()
    try:
        summary = loop.train(cfg)
    finally:
        loop.rl_step = original
    wall = time.perf_counter() - t0
    rows = [json.loads(r) for r in (Path(cfg.run.out_dir) / "metrics.jsonl").read_text().splitlines() if r]
    steps = [r for r in rows if r["step"] > 0]
    return Result(framework="creditlab", steps=len(steps), samples=int(summary["samples"]),
                  step_s=[r["time/step"] for r in steps], rollout_s=[r["time/rollout"] for r in steps],
                  update_s=[r["time/update"] for r in steps], reward_mean=[r["reward/mean"] for r in steps],
                  final_accuracy=summary["final_accuracy"], initial_accuracy=summary["initial_accuracy"], wall_s=wall,
                  accuracy_at={r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r},
                  peak_mb=[m.peak_mb for m in memory], delta_mb=[m.delta_mb for m in memory],
                  notes={"sampling": "bf16 autocast, fp32 master weights" if cfg.rollout.bf16 else "fp32",
                         "update": "bf16 autocast, fp32 master weights and AdamW" if cfg.optim.update_bf16 else "fp32",
                         "prompt_sharing": "one prompt forward per group in prefill and update"})


# ---------------------------------------------------------------------------------------------------- TRL
def trl_prompt(policy: Policy, text: str) -> Any:
    """TRL's input for one problem: a conversation when the tokenizer has a chat template (TRL applies it), else
    the string creditlab's `format_prompt` builds (the tiny policy has no template)."""
    if getattr(policy.tokenizer, "chat_template", None):
        return [{"role": "user", "content": text}]
    return policy.format_prompt(text)


def trl_accuracy(model: Any, tokenizer: Any, task: Any, held_out: list[Problem], sizes: Sizes) -> float:
    """Held-out greedy accuracy of TRL's model with creditlab's `evaluate()` (the same evaluation both sides get)."""
    return loop.evaluate(Policy(model=model, tokenizer=tokenizer, name="trl"), task, held_out,
                         max_new_tokens=sizes.max_new_tokens)


def make_trl_trainer(args: argparse.Namespace, sizes: Sizes, pair: Pair, policy: Policy, task: Any,
                     problems: list[Problem], out_dir: Path, held_out: list[Problem] | None = None) -> Any:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    class StepTimer(TrainerCallback):
        """Wall time and peak memory of each step (on_step_begin .. on_step_end)."""

        def __init__(self) -> None:
            self.step_s: list[float] = []
            self.memory: list[PeakMemory] = []
            self._t0 = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.memory.append(PeakMemory(resolve_device(args.device)).__enter__())
            self._t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            self.step_s.append(time.perf_counter() - self._t0)
            self.memory[-1].__exit__(None, None, None)

    class MidEval(TrainerCallback):
        """Held-out accuracy every `--eval-every` steps (after StepTimer has stopped the step's clock); the end
        of training is evaluated by `run_pair`, as creditlab's last evaluation is part of `train`."""

        def __init__(self) -> None:
            self.accuracy_at: dict[int, float] = {}

        def on_step_end(self, cb_args: Any, state: Any, control: Any, model: Any = None, **k: Any) -> None:
            every = args.eval_every
            if not (every and held_out and state.global_step % every == 0 and state.global_step < state.max_steps):
                return
            was_training = model.training
            self.accuracy_at[state.global_step] = trl_accuracy(model, policy.tokenizer, task, held_out, sizes)
            model.train(was_training)

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that records how long each generation (`_generate`: sampling + decode) takes."""

        rollout_s: list[float]

        def _generate(self, prompts: list) -> Any:
            t0 = time.perf_counter()
            out = super()._generate(prompts)
            self.rollout_s.append(time.perf_counter() - t0)
            return out

    def reward(prompts: list, completions: list, row: list[int], **kwargs: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [task.score(problems[r], t).reward for r, t in zip(row, texts)]

    reward.__name__ = f"{TASK}_score"
    dataset = Dataset.from_dict({"prompt": [trl_prompt(policy, p.prompt) for p in problems],
                                 "row": list(range(len(problems)))})
    # transformers 5 renamed gradient_checkpointing (TRL's default True) to activation_checkpointing: set the new
    # name where it exists, so that the old one is not read (and warned about)
    name = "activation_checkpointing" if "activation_checkpointing" in GRPOConfig.__dataclass_fields__ \
        else "gradient_checkpointing"
    checkpointing = {name: args.trl_gradient_checkpointing}
    config = GRPOConfig(
        output_dir=str(out_dir), use_cpu=resolve_device(args.device).type == "cpu", seed=args.seed,
        per_device_train_batch_size=sizes.prompts * sizes.group, num_generations=sizes.group,
        gradient_accumulation_steps=1, num_iterations=1, max_steps=len(problems) // sizes.prompts,
        max_completion_length=sizes.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        shuffle_dataset=False, bf16=pair.trl_bf16, fp16=False, **checkpointing,
        logging_steps=1, report_to="none", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
    )
    timer, mid_eval = StepTimer(), MidEval()
    trainer = TimedGRPOTrainer(model=policy.model, reward_funcs=reward, args=config, train_dataset=dataset,
                               processing_class=policy.tokenizer, callbacks=[timer, mid_eval])  # timer first
    trainer.rollout_s = []
    trainer.step_timer = timer
    trainer.mid_eval = mid_eval
    return trainer


def run_trl(args: argparse.Namespace, sizes: Sizes, pair: Pair, policy: Policy, task: Any, problems: list[Problem],
            out_dir: Path, held_out: list[Problem] | None = None) -> tuple[Result, Any]:
    t0 = time.perf_counter()
    trainer = make_trl_trainer(args, sizes, pair, policy, task, problems, out_dir, held_out)
    trainer.train()
    wall = time.perf_counter() - t0
    logs = [h for h in trainer.state.log_history if "reward" in h]
    steps = trainer.state.global_step
    result = Result(framework="trl", steps=steps, samples=steps * sizes.prompts * sizes.group,
                    step_s=list(trainer.step_timer.step_s), rollout_s=list(trainer.rollout_s),
                    reward_mean=[float(h["reward"]) for h in logs], wall_s=wall,
                    accuracy_at=dict(trainer.mid_eval.accuracy_at),
                    peak_mb=[m.peak_mb for m in trainer.step_timer.memory],
                    delta_mb=[m.delta_mb for m in trainer.step_timer.memory],
                    notes={"optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
                           "generation": "transformers generate, " + ("bf16 autocast" if pair.trl_bf16 else "fp32"),
                           "training": "bf16 mixed precision" if pair.trl_bf16 else "fp32",
                           "gradient_checkpointing": _checkpointing(trainer.model)})
    return result, trainer


def _checkpointing(model: Any) -> bool:
    """Whether activation (gradient) checkpointing is on; transformers 5 renamed the property."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def check_prompt_format(args: argparse.Namespace, sizes: Sizes, policy: Policy, task: Any,
                        problems: list[Problem], out_dir: Path) -> dict[str, Any]:
    """Do TRL and creditlab feed the model the same prompt tokens? (TRL tokenizes with its own code path.)"""
    trainer = make_trl_trainer(args, sizes, PAIRS["fp32"], policy, task, problems[:sizes.prompts], out_dir)
    texts = [p.prompt for p in problems[:sizes.prompts]]
    theirs, _, _ = trainer._tokenize_prompts([trl_prompt(policy, t) for t in texts])
    ids, mask = policy.encode_prompts([policy.format_prompt(t) for t in texts])
    ours = [row[m].tolist() for row, m in zip(ids, mask)]
    theirs = [list(map(int, t)) for t in theirs]
    shutil.rmtree(out_dir, ignore_errors=True)
    return {"match": ours == theirs, "example": policy.format_prompt(texts[0]),
            "tokens_creditlab": len(ours[0]), "tokens_trl": len(theirs[0]),
            "chat_template": bool(getattr(policy.tokenizer, "chat_template", None))}


# ---------------------------------------------------------------------------------------------------- profile
def profile_creditlab_step(cfg: TrainConfig, mode: str, top: int) -> str:
    """One creditlab step (`rl_step`, after an untimed step) under cProfile or torch.profiler; the top entries."""
    original = loop.rl_step
    report: list[str] = []
    calls = {"n": 0}

    def profiled(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:  # the first step only warms this process's caches
            return original(*a, **k)
        if mode == "torch":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
                out = original(*a, **k)
            report.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
            return out
        prof = cProfile.Profile()
        out = prof.runcall(original, *a, **k)
        for sort in ("cumulative", "tottime"):
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(sort).print_stats(top)
            report.append(f"--- sorted by {sort} ---\n{buf.getvalue().strip()}\n")
        return out

    loop.rl_step = profiled
    try:
        loop.train(cfg)
    finally:
        loop.rl_step = original
    return "\n".join(report)


# ---------------------------------------------------------------------------------------------------- report
def markdown(cl: Result, tr: Result, ratio: float, meta: dict[str, Any], pair: Pair) -> str:
    def row(r: Result) -> str:
        s = r.summary()
        init = f"{r.initial_accuracy:.3f} → " if r.initial_accuracy is not None else ""
        upd = f"{statistics.fmean(r.update_s):.2f}" if r.update_s else "—"
        return (f"| {r.framework} | {s['samples_per_s']:.2f} | {s['step_s_mean']:.2f} | {s['rollout_s_mean']:.2f} | "
                f"{upd} | {s['peak_mb_max']:.0f} | {s['delta_mb_max']:.0f} | {init}{r.final_accuracy:.3f} |")

    peak_ratio = cl.summary()["peak_mb_max"] / tr.summary()["peak_mb_max"]
    lines = [
        f"**{pair.name}** — {meta['policy']} on one-digit `{TASK}`, {meta['prompts']} prompts × {meta['group']} "
        f"samples × {meta['max_new_tokens']} new tokens, lr {meta['lr']:g}, {meta['steps']} steps, seed "
        f"{meta['seed']}, {meta['threads']} torch threads, {meta['eval_problems']} held-out problems (greedy); "
        f"{meta['where']}.",
        f"creditlab: sampling {cl.notes.get('sampling', '?')}; update {cl.notes.get('update', '?')}; "
        f"{cl.notes.get('prompt_sharing', '')}. TRL: {tr.notes.get('generation', '?')}; training "
        f"{tr.notes.get('training', '?')}.",
        "",
        "| framework | samples/s | s/step | rollout s/step | update s/step | peak RSS MiB | step Δ MiB | held-out "
        "accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        row(cl),
        row(tr),
        "",
        f"creditlab / TRL samples/s: **{ratio:.2f}×**; peak memory per step {peak_ratio:.2f}× TRL's; accuracy "
        f"creditlab {cl.final_accuracy:.3f} vs TRL {tr.final_accuracy:.3f}.",
    ]
    if len(cl.accuracy_at) > 2 or len(tr.accuracy_at) > 2:  # --eval-every: the two learning curves
        steps = sorted(set(cl.accuracy_at) | set(tr.accuracy_at))
        cell = lambda r, s: f"{r.accuracy_at[s]:.3f}" if s in r.accuracy_at else "—"  # noqa: E731
        lines += ["", "| held-out accuracy at step | " + " | ".join(map(str, steps)) + " |",
                  "|---|" + "---:|" * len(steps),
                  *(f"| {r.framework} | " + " | ".join(cell(r, s) for s in steps) + " |" for r in (cl, tr))]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--steps", type=int, default=10, help="timed training steps of each framework")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (both)")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default=None,
                   help="which equal-precision pairs to run (default: both where the device has native bf16, "
                        "else fp32)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda[:N] (both frameworks)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="custom mix: creditlab samples under bf16 autocast (instead of --precision's pairs)")
    p.add_argument("--update-bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="custom mix: creditlab's update under bf16 autocast (fp32 master weights, fp32 AdamW)")
    p.add_argument("--trl-bf16", action="store_true", help="custom mix: TRL's bf16=True (mixed precision)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true",
                   help="TRL's GRPOConfig default gradient_checkpointing=True")
    p.add_argument("--eval-problems", type=int, default=None, help="held-out problems (default 128; tiny: 4)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate both policies every N steps (untimed; 0: only at the start and the end)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps of each framework (0: none)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--tiny", action="store_true", help="smoke mode: tiny policy (no chat template), tiny sizes")
    p.add_argument("--profile", nargs="?", const="cprofile", choices=["cprofile", "torch"], default=None,
                   help="also profile one creditlab step (cProfile, or torch.profiler) and print the top entries")
    p.add_argument("--profile-top", type=int, default=25)
    p.add_argument("--out", type=Path, default=None, help="write the numbers (JSON) here and a markdown table "
                                                          "next to it (.md)")
    p.add_argument("--work-dir", type=Path, default=None, help="run directories (default: a temporary directory, "
                                                               "removed at the end)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.eval_every < 0:
        p.error("--eval-every must be >= 0")
    return args


def pairs_from_args(args: argparse.Namespace) -> list[Pair]:
    """The precision pairs to run: a custom mix when --bf16/--update-bf16/--trl-bf16 is given, else --precision."""
    if args.bf16 is not None or args.update_bf16 is not None or args.trl_bf16:
        return [Pair("custom", bool(args.bf16), bool(args.update_bf16), args.trl_bf16)]
    choice = args.precision or ("both" if native_bf16(resolve_device(args.device)) else "fp32")
    return [PAIRS["fp32"], PAIRS["bf16"]] if choice == "both" else [PAIRS[choice]]


def run_pair(args: argparse.Namespace, sizes: Sizes, pair: Pair, work: Path, eval_problems: int,
             log: Any) -> tuple[Result, Result, dict[str, Any]]:
    """Warm-up, creditlab, TRL and TRL's evaluation for one precision pair; (creditlab, TRL, prompt check)."""
    task = get_task(TASK, **TASK_KWARGS)
    cfg = train_config(args, sizes, pair, steps=args.steps, out_dir=work / "creditlab", eval_problems=eval_problems)
    pool = task.problems("train", cfg.run.train_pool, cfg.run.seed)
    trl_problems = [q for step in step_problems(cfg, pool, args.steps) for q in step]
    held_out = task.problems("test", eval_problems, cfg.run.seed)  # what train(cfg) evaluates on
    device = resolve_device(args.device)
    policy = load_policy(sizes.policy, seed=args.seed, device=device)
    prompt_check = check_prompt_format(args, sizes, policy, task, trl_problems, work / "check-trl")
    log(f"[{pair.name}] prompt tokens identical in TRL and creditlab: {prompt_check['match']}")
    if args.warmup:
        log(f"[{pair.name}] warm-up: {args.warmup} untimed step(s) of each (throwaway copies of the policy)")
        warm = train_config(args, sizes, pair, steps=args.warmup, out_dir=work / "warm-creditlab", eval_problems=0)
        loop.train(warm)
        shutil.rmtree(work / "warm-creditlab", ignore_errors=True)
        warm_problems = [q for step in step_problems(cfg, pool, args.warmup) for q in step]
        warm_trl, trainer = run_trl(args, sizes, pair, policy, task, warm_problems, work / "warm-trl")
        del trainer
        log(f"[{pair.name}] warm-up done: TRL {warm_trl.step_s[0]:.1f} s/step")
    del policy
    gc.collect()
    log(f"[{pair.name}] creditlab: train(cfg) for {args.steps} steps")
    cl = run_creditlab(cfg)
    log(f"[{pair.name}] creditlab: {cl.samples_per_s:.2f} samples/s, accuracy {cl.initial_accuracy:.3f} -> "
        f"{cl.final_accuracy:.3f}")
    shutil.rmtree(work / "creditlab", ignore_errors=True)  # checkpoints ~2 GB; the numbers are in `cl`
    gc.collect()
    log(f"[{pair.name}] TRL: GRPOTrainer.train() for {args.steps} steps")
    policy = load_policy(sizes.policy, seed=args.seed, device=device)  # the same initial weights
    tr, trainer = run_trl(args, sizes, pair, policy, task, trl_problems, work / "trl", held_out)
    model = trainer.accelerator.unwrap_model(trainer.model)
    tr.final_accuracy = trl_accuracy(model, policy.tokenizer, task, held_out, sizes)
    tr.initial_accuracy = cl.initial_accuracy  # same initial policy, same held-out problems
    start = {} if tr.initial_accuracy is None else {0: tr.initial_accuracy}
    tr.accuracy_at = {**start, **tr.accuracy_at, tr.steps: tr.final_accuracy}
    log(f"[{pair.name}] TRL: {tr.samples_per_s:.2f} samples/s, accuracy {tr.final_accuracy:.3f}")
    del trainer, model, policy
    shutil.rmtree(work / "trl", ignore_errors=True)
    gc.collect()
    return cl, tr, prompt_check


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import trl
    except ImportError:
        print("vs_trl needs TRL: run it with .venv-trl/bin/python (make .venv-trl/.installed)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = TINY if args.tiny else FULL
    eval_problems = sizes.eval_problems if args.eval_problems is None else args.eval_problems
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="creditlab-vs-trl-"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(f"[vs_trl {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    device = resolve_device(args.device)
    meta = {"policy": sizes.policy, "task": TASK, "task_kwargs": TASK_KWARGS, "prompts": sizes.prompts,
            "group": sizes.group, "max_new_tokens": sizes.max_new_tokens, "lr": args.lr, "steps": args.steps,
            "seed": args.seed, "temperature": args.temperature,
            "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
            "eval_problems": eval_problems, "eval_every": args.eval_every,
            "warmup_steps": args.warmup, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "trl": trl.__version__,
            "transformers": __import__("transformers").__version__, "python": platform.python_version(),
            "machine": platform.machine(), "where": describe(device), "environment": device_info(device),
            **{k: v for k, v in environment(args.device).items() if k in ("git_commit", "git_dirty")}}
    report: dict[str, Any] = {"meta": meta, "pairs": {}}
    tables, profile_text = [], None
    try:
        for pair in pairs_from_args(args):
            cl, tr, prompt_check = run_pair(args, sizes, pair, work / pair.name, eval_problems, log)
            ratio = cl.samples_per_s / tr.samples_per_s
            table = markdown(cl, tr, ratio, meta, pair)
            tables.append(table)
            report["pairs"][pair.name] = {"precision": asdict(pair), "creditlab": cl.summary(), "trl": tr.summary(),
                                          "ratio_samples_per_s": ratio, "prompt_format": prompt_check,
                                          "peak_mb_ratio": cl.summary()["peak_mb_max"] / tr.summary()["peak_mb_max"],
                                          "target": {"speed_ratio_min": 2.0, "speed_ok": ratio >= 2.0,
                                                     "accuracy_ok": cl.final_accuracy >= tr.final_accuracy},
                                          "markdown": table}
            print(table + "\n", flush=True)
        if args.profile:
            log(f"profiling one creditlab step ({args.profile})")
            first = pairs_from_args(args)[0]
            prof_cfg = train_config(args, sizes, first, steps=2, out_dir=work / "profile", eval_problems=0)
            profile_text = profile_creditlab_step(prof_cfg, args.profile, args.profile_top)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    first = next(iter(report["pairs"].values()))  # the first pair also at the top level (older readers)
    report.update({k: first[k] for k in ("creditlab", "trl", "ratio_samples_per_s", "prompt_format", "target")})
    report["markdown"] = "\n\n".join(tables)
    if profile_text is not None:
        report["profile"] = profile_text
        print(f"\n## creditlab step profile ({args.profile})\n{profile_text}")
    for name, r in report["pairs"].items():
        met = r["target"]["speed_ok"] and r["target"]["accuracy_ok"]
        print(f"[{name}] target (>= 2x samples/s at equal precision and equal or better accuracy): "
              f"{'met' if met else 'NOT met'} ({r['ratio_samples_per_s']:.2f}x)")
        if not r["prompt_format"]["match"]:
            print("WARNING: TRL and creditlab tokenized the prompts differently", file=sys.stderr)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=_json_default))
        args.out.with_suffix(".md").write_text(report["markdown"] + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
