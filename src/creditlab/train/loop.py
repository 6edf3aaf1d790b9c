"""The RL trainer: sample G responses per prompt -> score -> signals -> estimator -> PPO-clip -> eval.

Seeded and deterministic on CPU: every step derives its own seeds from (run seed, step), and checkpoints hold the
model, the optimizer and every component's state, so a resumed run replays exactly what an uninterrupted run
would have done. The configuration is validated before any work (`TrainConfig.validate`); the run directory's
rules are in `creditlab.train.rundir`, checkpoints (atomic, verified, read without executing code) in
`creditlab.train.checkpoint`, the metrics log in `creditlab.train.runlog`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from creditlab.batch import RolloutBatch
from creditlab.credit.metrics import advantage_metrics
from creditlab.device import device_info, resolve_bf16, resolve_device
from creditlab.policy import Policy, load_policy
from creditlab.registry import get_estimator, get_spec
from creditlab.rollout.hf import SamplingConfig, generate, sequence_logprobs
from creditlab.signals.produce import SignalContext, produce_signals
from creditlab.tasks import Problem, Task, get_task
from creditlab.train.attn_budget import anytime_eval_metrics
from creditlab.train.checkpoint import TrainState, atomic_write_text, load_checkpoint, save_checkpoint
from creditlab.train.checks import one_line
from creditlab.train.components import Component, build_components, build_rollout
from creditlab.train.config import TrainConfig
from creditlab.train.losses import aggregate, kl_penalty, micro_weights, ppo_clip_loss
from creditlab.train.rundir import check_run_dir, default_run_dir, open_run_dir
from creditlab.train.runlog import Logger

__all__ = ["Logger", "TrainState", "default_run_dir", "evaluate", "load_checkpoint", "rl_step", "save_checkpoint",
           "train"]


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919) % (2**31 - 1)


# ------------------------------------------------------------------ evaluation
def evaluate(policy: Policy, task: Task, problems: list[Problem], *, max_new_tokens: int, chunk: int = 64) -> float:
    """Greedy held-out accuracy: the fraction of problems whose single greedy response scores `correct`."""
    if not problems:
        return 0.0
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    correct = 0
    policy.model.eval()
    for start in range(0, len(problems), chunk):
        part = problems[start:start + chunk]
        batch = generate(policy, [policy.format_prompt(p.prompt) for p in part], 1, greedy, seed=0)
        correct += sum(task.score(p, text).correct for p, text in zip(part, batch.texts))
    return correct / len(problems)


# ------------------------------------------------------------------ samples for `creditlab inspect`
def dump_samples(path: Path, policy: Policy, batch: RolloutBatch, advantages: torch.Tensor, max_rows: int = 32) -> None:
    """Sampled responses token by token with their advantages (read by `creditlab inspect`)."""
    tok = policy.tokenizer
    rows = []
    for b in range(min(batch.B, max_rows)):
        n = int(batch.response_mask[b].sum())
        ids = batch.response_ids[b, :n].tolist()
        rows.append({"group": int(batch.group_ids[b]), "reward": float(batch.rewards[b]),
                     "prompt": tok.decode(batch.prompt_ids[b][batch.prompt_mask[b]].tolist(), skip_special_tokens=True)
                     if batch.prompt_ids is not None else "",
                     "tokens": [tok.decode([i]) for i in ids], "advantages": advantages[b, :n].tolist()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"rows": rows}))


# ------------------------------------------------------------------ one RL step
def ppo_update(cfg: TrainConfig, policy: Policy, ref_model: torch.nn.Module | None, optim: torch.optim.Optimizer,
               batch: RolloutBatch, advantages: torch.Tensor, gen: torch.Generator,
               components: Sequence[Component] = (), returns: torch.Tensor | None = None) -> dict[str, float]:
    o, model = cfg.optim, policy.model
    model.train()
    temp = cfg.rollout.temperature
    args = (batch.prompt_ids, batch.prompt_mask, batch.response_ids, batch.response_mask)
    autocast = lambda: torch.autocast(batch.response_ids.device.type, torch.bfloat16, enabled=o.update_bf16)  # noqa: E731
    old_logp = None
    if o.ppo_epochs > 1 or o.minibatches > 1:  # otherwise the first forward *is* the old policy: reuse it
        with torch.no_grad(), autocast():
            old_logp, _ = sequence_logprobs(model, *args, temperature=temp)
    ref_logp = None
    if o.kl_coef > 0 and ref_model is not None:
        ref_logp = batch.ref_logprobs
        if ref_logp is None:
            with torch.no_grad(), autocast():
                ref_logp, _ = sequence_logprobs(ref_model, *args, temperature=temp)
    norm_constant = o.norm_constant or float(cfg.rollout.max_new_tokens)
    want_hidden = any(c.wants_hidden for c in components)  # a value head on the trunk reads the same forward
    sums: dict[str, float] = {}
    n_updates = 0
    for _ in range(o.ppo_epochs):
        perm = torch.randperm(batch.B, generator=gen)
        for idx in perm.chunk(o.minibatches):
            # micro-batches: one forward/backward each, gradients accumulated with weights that make the sum the
            # minibatch's loss exactly (losses.micro_weights); peak activation memory scales with the micro-batch
            micro = idx.split(o.micro_batch_rows) if o.micro_batch_rows else (idx,)
            optim.zero_grad(set_to_none=True)
            m = {}
            for mid, w in zip(micro, micro_weights(batch.response_mask, micro, o.loss_agg)):
                for k, v in _micro_loss(o, model, components, batch, args, mid, advantages, old_logp, ref_logp,
                                        returns, temp, norm_constant, autocast, want_hidden, w).items():
                    m[k] = m.get(k, 0.0) + w * v
            m["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm))
            optim.step()
            for component in components:
                component.step()
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    return {k: v / max(n_updates, 1) for k, v in sums.items()}


def _micro_loss(o: Any, model: torch.nn.Module, components: Sequence[Component], batch: RolloutBatch, args: tuple,
                idx: torch.Tensor, advantages: torch.Tensor, old_logp: torch.Tensor | None,
                ref_logp: torch.Tensor | None, returns: torch.Tensor | None, temp: float, norm_constant: float,
                autocast: Any, want_hidden: bool, weight: float) -> dict[str, float]:
    """Forward rows `idx`, backward `weight` x (PPO-clip + KL + components' losses); returns the unweighted metrics."""
    mask = batch.response_mask[idx]
    with autocast():  # the precision old_logp used, so the first ratio is 1 up to float noise
        logp, _, *hidden = sequence_logprobs(model, *(a[idx] for a in args), temperature=temp,
                                             return_hidden=want_hidden)
    old = old_logp[idx] if old_logp is not None else logp.detach()
    pg_loss, m = ppo_clip_loss(logp, old, advantages[idx], mask, clip_low=o.clip_low, clip_high=o.clip_high,
                               dual_clip=o.dual_clip, agg=o.loss_agg, norm_constant=norm_constant)
    loss = pg_loss
    if ref_logp is not None:
        kl = aggregate(kl_penalty(logp, ref_logp[idx], o.kl_kind), mask, o.loss_agg, norm_constant=norm_constant)
        loss = loss + o.kl_coef * kl
        m["loss/kl"] = float(kl.detach())
    outputs = {"logp": logp, "backward_weight": torch.tensor(weight), **({"hidden": hidden[0]} if hidden else {}),
               **({"returns": returns[idx]} if returns is not None else {})}
    for component in components:  # e.g. a value head on the policy's trunk joins this backward
        extra, extra_m = component.loss(batch, idx, outputs)
        loss, m = loss + extra, {**m, **extra_m}
    (loss * weight).backward()
    return {**m, "loss/pg": float(pg_loss.detach()), "loss/total": float(loss.detach())}


def rl_step(cfg: TrainConfig, ctx: dict[str, Any], state: TrainState) -> tuple[dict[str, float], RolloutBatch, Any]:
    policy, task, pool, components = ctx["policy"], ctx["task"], ctx["pool"], ctx["components"]
    r = cfg.rollout
    seed = step_seed(cfg.run.seed, state.step + 1)
    gen = torch.Generator().manual_seed(seed)
    problems = [pool[i] for i in torch.randint(len(pool), (r.prompts_per_step,), generator=gen).tolist()]
    t0 = time.perf_counter()
    policy.model.eval()
    batch, scores = ctx["rollout"].collect(policy, task, problems, r, seed=seed)
    t1 = time.perf_counter()
    signal_ctx = SignalContext(policy=policy, problems=problems, scores=scores, task=task, seed=seed, cfg=cfg,
                               step=state.step + 1)
    for component in components:
        batch = component.produce(batch, signal_ctx)
    if "ref_logprobs" in ctx["needs"] and batch.ref_logprobs is None and ctx["ref_model"] is not None:
        with torch.no_grad():
            ref_logp, _ = sequence_logprobs(ctx["ref_model"], batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                            batch.response_mask, temperature=r.temperature)
        batch = batch.replace(ref_logprobs=ref_logp)
    batch = produce_signals(batch, ctx["needs"], signal_ctx)
    batch = batch.to(batch.response_ids.device)  # fields a producer made on the CPU join the policy's device
    t2 = time.perf_counter()
    credit = get_estimator(cfg.run.estimator)(batch, **ctx["est_kwargs"])
    t3 = time.perf_counter()
    for group in ctx["optim"].param_groups:  # a function of the step alone, so --resume needs no scheduler state
        group["lr"] = cfg.optim.lr * min(1.0, (state.step + 1) / max(cfg.optim.warmup_steps, 1))
    if state.step < cfg.critic.critic_warmup:  # verl's critic_warmup: only the critic trains (in update below)
        metrics = {"critic/warmup": 1.0}
    else:
        metrics = ppo_update(cfg, policy, ctx["ref_model"], ctx["optim"], batch, credit.advantages, gen, components,
                             returns=credit.returns)
    for component in components:  # online parts train after the policy step, as OPRL/iStar orders it
        metrics.update(component.update(batch, signal_ctx, credit))
        metrics.update(component.metrics())
    t4 = time.perf_counter()
    mask = batch.response_mask
    lengths = mask.sum(1).float()
    metrics.update({
        "reward/mean": float(batch.rewards.mean()), "reward/std": float(batch.rewards.std(unbiased=False)),
        "train/accuracy": sum(s.correct for s in scores) / len(scores),
        "policy/entropy": float((batch.entropies * mask).sum() / mask.sum().clamp_min(1))
        if batch.entropies is not None else 0.0,
        "response/length": float(lengths.mean()),
        "response/truncated_frac": float((lengths >= r.max_new_tokens).float().mean()),
        "samples": state.samples + batch.B + int(signal_ctx.counters.get("samples/extra", 0)),
        "optim/lr": ctx["optim"].param_groups[0]["lr"],
        "time/rollout": t1 - t0, "time/signals": t2 - t1, "time/credit": t3 - t2, "time/update": t4 - t3,
        "time/step": t4 - t0,
        **advantage_metrics(credit.advantages, mask), **credit.metrics,
        **signal_ctx.metrics(batch),
    })
    return metrics, batch, credit


# ------------------------------------------------------------------ the run
def build_run(cfg: TrainConfig) -> dict[str, Any]:
    """Everything a run needs that can fail on the user's input (task files, policy directory, components), built
    before the run directory is touched; errors name the option."""
    torch.manual_seed(cfg.run.seed)
    spec = get_spec(cfg.run.estimator)
    try:
        task = get_task(cfg.run.task, **cfg.task_kwargs())
        pool = task.problems("train", cfg.run.train_pool, cfg.run.seed)
        held_out = task.problems("test", cfg.eval.eval_problems, cfg.run.seed)
    except (TypeError, ValueError, KeyError) as e:
        raise ValueError(f"--task {cfg.run.task} --task-kwargs {cfg.run.task_kwargs}: {one_line(e)}") from None
    device = resolve_device(cfg.run.device)
    try:
        policy = load_policy(cfg.run.policy, seed=cfg.run.seed, device=device)
    except ValueError as e:
        raise ValueError(f"--policy: {one_line(e)}") from None
    cfg = with_precision(cfg, device, policy.model)  # auto (None) precision decided for this device and model
    ref_model = None
    needs = (*spec.needs, "ref_logprobs") if cfg.critic.critic_kl_in_reward > 0 else spec.needs  # KL reward
    if cfg.optim.kl_coef > 0 or "ref_logprobs" in needs:  # copied before a resume loads the trained weights
        ref_model = copy.deepcopy(policy.model).eval().requires_grad_(False)
    optim = torch.optim.AdamW(policy.model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    return {"policy": policy, "task": task, "ref_model": ref_model, "optim": optim, "needs": needs,
            "components": build_components(cfg, spec, policy, task), "est_kwargs": cfg.estimator_kwargs(),
            "rollout": build_rollout(cfg, task), "pool": pool, "held_out": held_out, "cfg": cfg,
            "device": device}


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one RL run; returns a summary with initial and final held-out accuracy."""
    cfg.validate()
    run_dir = check_run_dir(cfg)
    ctx = build_run(cfg)
    lock = open_run_dir(run_dir)
    try:
        return _run(cfg, ctx, run_dir)
    finally:
        lock.close()


def _run(asked: TrainConfig, ctx: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    cfg = ctx["cfg"]  # precision decided; config.json keeps what was asked (auto = None) for --resume checks
    policy, task, optim, components = ctx["policy"], ctx["task"], ctx["optim"], ctx["components"]
    state = load_checkpoint(run_dir, policy.model, optim, components) if cfg.run.resume else TrainState()
    if state.step > cfg.run.steps:
        raise ValueError(f"--steps {cfg.run.steps} is below step {state.step} of the checkpoint in {run_dir}")
    atomic_write_text(run_dir / "config.json", json.dumps(asked.to_dict(), indent=2))
    precision = {"rollout_bf16": cfg.rollout.bf16, "update_bf16": cfg.optim.update_bf16}
    atomic_write_text(run_dir / "device.json", json.dumps(precision | device_info(ctx["device"]), indent=2))
    logger = Logger(run_dir, tensorboard=cfg.log.tensorboard, keep_until=state.step if cfg.run.resume else None)
    custom = getattr(ctx["rollout"], "evaluate", None)  # multi-turn rollouts evaluate whole episodes

    def evaluate_now() -> dict[str, float]:  # held-out accuracy, and accuracy at each budget when budgets are set
        if callable(custom):
            return {"eval/accuracy": custom(policy, task, ctx["held_out"], cfg.rollout)}
        return {"eval/accuracy": evaluate(policy, task, ctx["held_out"], max_new_tokens=cfg.rollout.max_new_tokens),
                **anytime_eval_metrics(cfg, policy, task, ctx["held_out"])}

    if state.step == 0:
        logger.log(0, {**evaluate_now(), "samples": 0} if cfg.eval.eval_problems else {"samples": 0})
    initial = next((r.get("eval/accuracy") for r in logger.rows if r["step"] == 0), None)
    bar = _progress(cfg, state.step, logger.last("eval/accuracy"))
    while state.step < cfg.run.steps:
        metrics, batch, credit = rl_step(cfg, ctx, state)
        state.step += 1
        state.samples = int(metrics["samples"])
        if cfg.eval.eval_problems and (state.step % cfg.eval.eval_every == 0 or state.step == cfg.run.steps):
            metrics.update(evaluate_now())
        logger.log(state.step, metrics)
        if cfg.log.sample_every and (state.step % cfg.log.sample_every == 0 or state.step == 1):
            dump_samples(run_dir / "samples" / f"step_{state.step:06d}.json", policy, batch, credit.advantages)
        if state.step % cfg.log.checkpoint_every == 0 or state.step == cfg.run.steps:
            save_checkpoint(run_dir, state, policy.model, optim, components)
        if bar is not None:
            bar.update(1)
            acc = logger.last("eval/accuracy")  # the last evaluation, not nan between evaluations
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", acc="-" if acc is None else f"{acc:.3f}")
    if bar is not None:
        bar.close()
    logger.close()
    policy.model.save_pretrained(run_dir / "policy")
    policy.tokenizer.save_pretrained(run_dir / "policy")
    return {"run_dir": str(run_dir), "initial_accuracy": initial, "final_accuracy": logger.last("eval/accuracy"),
            "steps": state.step, "samples": state.samples}


def with_precision(cfg: TrainConfig, device: torch.device, model: torch.nn.Module) -> TrainConfig:
    """A copy of `cfg` with --bf16 / --update-bf16 decided: unset (None) means auto (`creditlab.device`)."""
    n_params = sum(p.numel() for p in model.parameters())
    rollout = dataclasses.replace(cfg.rollout, bf16=resolve_bf16(cfg.rollout.bf16, device, n_params))
    optim = dataclasses.replace(cfg.optim, update_bf16=resolve_bf16(cfg.optim.update_bf16, device, n_params))
    return dataclasses.replace(cfg, rollout=rollout, optim=optim)


def _progress(cfg: TrainConfig, start: int, acc: float | None) -> Any:
    if not cfg.log.progress:
        return None
    from tqdm import tqdm

    bar = tqdm(total=cfg.run.steps, initial=start, desc=f"{cfg.run.estimator}", dynamic_ncols=True)
    if acc is not None:
        bar.set_postfix(acc=f"{acc:.3f}")
    return bar
