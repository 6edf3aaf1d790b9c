"""`creditlab bench`: estimators × tasks × seeds through the trainer's own entry point (`train(TrainConfig)`).

Every run is an ordinary `creditlab train` run (same config dataclasses, same loop), so a benchmark number is
reproducible with one `creditlab train` command taken from the run's config.json. Layout of `--out`:

    warmstart/<task>/                    the SFT warm-start shared by every run of the task (fixed bench settings)
    runs/<task>/<estimator>/seed<k>/     the trainer's run directory (checkpoints, samples, metrics.jsonl, config.json)
    results/<task>/<estimator>/seed<k>.jsonl   a copy of the run's metrics.jsonl (one line per step)
    results/<task>/<estimator>/seed<k>.json    summary: final accuracy, train seconds, wall seconds, run dir
    results/env.json                     git commit + dirty flag, package versions, the benchmark's settings
    report.md, curves.png (curves_<task>.png per task)

Resumable: a run whose metrics.jsonl ends at step == --steps (with its final evaluation) is skipped; a run with a
checkpoint resumes from it (the trainer's --resume replays exactly); a run directory without a checkpoint is
started again. Rerunning the same command therefore only does what is missing.

Samples: x axes and "samples to target" count every generated response: the trainer's cumulative `samples`
column plus a cumulative `samples_extra` column when a scorer or estimator logs one (Monte-Carlo continuations;
none of the current ones generates extra samples, so it is absent and counts 0).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from creditlab.train.config import EvalConfig, LogConfig, OptimConfig, RolloutConfig, RunConfig, TrainConfig

# Fields a trainer run can fill without a scorer: the rollout engine's (see rollout.hf.generate) ...
ROLLOUT_FIELDS = ("response_ids", "prompt_ids", "prompt_mask", "logprobs", "entropies", "certainty", "token_logits",
                  "texts")
# ... and what each step scorer adds (signals.prm.produce_step_signals).
SCORER_FIELDS = {"oracle": ("step_ids", "step_rewards"),
                 "implicit": ("step_ids", "step_rewards", "prm_logprobs", "ref_logprobs")}
# Scorer options per estimator where the estimator's paper trains the implicit PRM with its own loss.
SCORER_KWARGS = {"oprl": {"mode": "oprl"}}


@dataclass(frozen=True)
class BenchTask:
    """One benchmark task: the trainer's task + options, the base policy, and its SFT warm-start (0 = none)."""

    task: str
    task_kwargs: str
    policy: str
    sft_steps: int


# The tiny/arith_chain warm-start and trainer settings of the benchmarks (`bench`, `credit-quality`). They are the
# first `make demo`'s and stay fixed so that the numbers in README/docs reproduce; the demo has since moved to
# sloppy demonstrations (see creditlab.demo).
BENCH_TASK = "arith_chain"
BENCH_TASK_KWARGS = json.dumps({"n_steps": 2, "ops": "+-"})
BENCH_SFT_STEPS = 200


def bench_train_config(policy_dir: str, estimator: str, out_dir: str, seed: int, steps: int) -> TrainConfig:
    """The benchmarks' trainer settings (16 prompts × 8 samples, 40 tokens, temperature 0.7, lr 1e-4)."""
    return TrainConfig(
        run=RunConfig(task=BENCH_TASK, task_kwargs=BENCH_TASK_KWARGS, policy=policy_dir, estimator=estimator,
                      out_dir=out_dir, seed=seed, steps=steps),
        rollout=RolloutConfig(prompts_per_step=16, group_size=8, temperature=0.7, max_new_tokens=40),
        optim=OptimConfig(lr=1e-4),
        eval=EvalConfig(eval_every=10, eval_problems=128),
        log=LogConfig(checkpoint_every=steps, progress=True),
    )


def bench_tasks() -> dict[str, BenchTask]:
    return {"arith_chain": BenchTask(BENCH_TASK, BENCH_TASK_KWARGS, "tiny", BENCH_SFT_STEPS),
            "chain_sum": BenchTask("chain_sum", "{}", "smollm2", 0)}


@dataclass(frozen=True)
class Preset:
    estimators: tuple[str, ...]  # () = every registered estimator the trainer can run (`runnable_estimators`)
    tasks: tuple[str, ...]
    seeds: int
    steps: int
    prompts_per_step: int | None = None  # None (here and below): bench_train_config's
    group_size: int | None = None
    max_new_tokens: int | None = None
    eval_every: int = 5
    eval_problems: int = 128
    target: float = 0.2  # held-out accuracy for "samples to target" (the bench warm-start reaches ~0.16)
    sft_steps: int | None = None  # None: the task's warm-start; 0: no warm-start (raw policy)


PRESETS = {
    # ~15 min on 2 idle cores: SFT ~40 s, then 12 runs × 20 steps at ~2 s per step plus 5 evaluations each
    "quick": Preset(("grpo", "rloo", "tempo", "hicra", "ucas", "ktae"), ("arith_chain",), seeds=2, steps=20),
    "full": Preset((), ("arith_chain",), seeds=3, steps=60, eval_every=10, target=0.3),
    # tests / smoke checks: untrained tiny, seconds per run
    "micro": Preset(("grpo",), ("arith_chain",), seeds=1, steps=2, prompts_per_step=4, group_size=4,
                    max_new_tokens=24, eval_every=2, eval_problems=8, target=0.1, sft_steps=0),
}


# ------------------------------------------------------------------------------------------------ estimators
def scorer_for(name: str) -> tuple[str, str]:
    """(scorer, scorer_kwargs JSON) for an estimator: the implicit PRM when it reads prm_logprobs, the oracle
    scorer when it reads step_rewards, none (the task's producers) otherwise."""
    needs = _needs(name)
    if "prm_logprobs" in needs:
        return "implicit", json.dumps(SCORER_KWARGS.get(name, {}))
    if "step_rewards" in needs:
        return "oracle", json.dumps(SCORER_KWARGS.get(name, {}))
    return "", "{}"


def _needs(name: str) -> tuple[str, ...]:
    from creditlab.registry import get_spec

    return get_spec(name).needs


def missing_signals(name: str) -> list[str]:
    """Fields `name` needs that no trainer run can produce (empty: the estimator can be benchmarked)."""
    from creditlab.signals.produce import PRODUCERS

    scorer, _ = scorer_for(name)
    can = {*ROLLOUT_FIELDS, *PRODUCERS, *SCORER_FIELDS.get(scorer, ())}
    return [f for f in _needs(name) if f not in can]


def runnable_estimators() -> list[str]:
    """Every registered estimator whose needs the trainer can fill (e.g. not gae: it needs a critic)."""
    from creditlab.registry import list_estimators

    return [n for n in list_estimators() if not missing_signals(n)]


# ------------------------------------------------------------------------------------------------ environment
def environment() -> dict[str, Any]:
    """git commit + dirty flag of the creditlab checkout, package versions, python, platform, torch threads."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                                  cwd=Path(__file__).parent).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    def pkg(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    commit = git("rev-parse", "HEAD")
    return {"git_commit": commit or "unknown", "git_dirty": bool(git("status", "--porcelain")) if commit else None,
            "torch": torch.__version__, "transformers": pkg("transformers"), "creditlab": pkg("creditlab"),
            "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------------ runs
def run_config(p: Preset, task: BenchTask, policy: str, estimator: str, seed: int, run_dir: Path,
               progress: bool) -> Any:
    """The TrainConfig of one benchmark run: `bench_train_config` with the preset's sizes."""
    cfg = bench_train_config(policy, estimator, str(run_dir), seed, steps=p.steps)
    scorer, scorer_kwargs = scorer_for(estimator)
    cfg.run = replace(cfg.run, task=task.task, task_kwargs=task.task_kwargs, scorer=scorer,
                      scorer_kwargs=scorer_kwargs)
    sizes = {"prompts_per_step": p.prompts_per_step, "group_size": p.group_size, "max_new_tokens": p.max_new_tokens}
    cfg.rollout = replace(cfg.rollout, **{k: v for k, v in sizes.items() if v is not None})
    cfg.eval = replace(cfg.eval, eval_every=p.eval_every, eval_problems=p.eval_problems)
    cfg.log = replace(cfg.log, checkpoint_every=5, tensorboard=False, progress=progress)  # and at the end
    return cfg


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_finished(run_dir: Path, steps: int) -> bool:
    """The run logged step == steps together with its final evaluation."""
    rows = read_rows(run_dir / "metrics.jsonl")
    return bool(rows) and rows[-1]["step"] == steps and "eval/accuracy" in rows[-1]


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """A run's config without what may change between attempts (steps, resume, progress display)."""
    out = json.loads(json.dumps(d))
    for section, key in (("run", "steps"), ("run", "resume"), ("log", "progress")):
        out.get(section, {}).pop(key, None)
    return out


def check_same_settings(run_dir: Path, cfg: Any) -> None:
    """Refuse to skip or resume a run that was made with other settings (e.g. after the bench settings changed)."""
    saved = run_dir / "config.json"
    if saved.exists() and _comparable(json.loads(saved.read_text())) != _comparable(cfg.to_dict()):
        raise ValueError(f"bench: {run_dir} was made with other settings than this benchmark's "
                         f"(compare its config.json); pick a new --out or delete that run")


def run_one(cfg: Any, result: Path) -> str:
    """Train (or resume, or skip) one run and copy its metrics to `result` (.jsonl, plus a .json summary).
    Returns what happened: "skipped", "resumed" or "trained"."""
    from creditlab.train.loop import train

    run_dir = Path(cfg.run.out_dir)
    check_same_settings(run_dir, cfg)
    result.parent.mkdir(parents=True, exist_ok=True)
    meta_path = result.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"wall_s": 0.0}
    if is_finished(run_dir, cfg.run.steps):
        what = "skipped"
    else:
        what = "resumed" if (run_dir / "latest").exists() else "trained"
        if what == "trained":
            shutil.rmtree(run_dir, ignore_errors=True)  # an attempt killed before its first checkpoint
        cfg.run.resume = what == "resumed"
        t0 = time.perf_counter()
        train(cfg)
        meta["wall_s"] = meta.get("wall_s", 0.0) + time.perf_counter() - t0  # a killed attempt never gets here
    shutil.copyfile(run_dir / "metrics.jsonl", result)
    rows = read_rows(result)
    meta.update({"run_dir": str(run_dir), "steps": rows[-1]["step"], "final_accuracy": rows[-1]["eval/accuracy"],
                 "initial_accuracy": rows[0].get("eval/accuracy"), "samples": total_samples(rows[-1]),
                 "train_s": sum(r.get("time/step", 0.0) for r in rows)})
    meta_path.write_text(json.dumps(meta, indent=2))
    return what


def warm_start(task_name: str, task: BenchTask, out: Path, sft_steps: int) -> str:
    """The task's base policy, SFT-warm-started once into out/warmstart/<task> (cached) when sft_steps > 0."""
    if sft_steps <= 0:
        return task.policy
    from creditlab.train.config import SFTConfig

    target = out / "warmstart" / task_name
    cfg = SFTConfig(task=task.task, task_kwargs=task.task_kwargs, policy=task.policy, out_dir=str(target), seed=0,
                    steps=sft_steps)
    cached_sft(cfg)
    return str(target)


def cached_sft(cfg: Any) -> None:
    """`sft(cfg)` unless cfg.out_dir already holds a warm-start made with exactly this SFTConfig."""
    from creditlab.train.sft import sft

    marker = Path(cfg.out_dir) / "warmstart.json"  # written after sft() returned: the warm-start is complete
    if marker.exists() and json.loads(marker.read_text()) == asdict(cfg):
        return
    print(f"warm-starting {cfg.policy} on {cfg.task} {cfg.task_kwargs} ({cfg.steps} SFT steps) -> {cfg.out_dir}",
          flush=True)
    sft(cfg)
    marker.write_text(json.dumps(asdict(cfg), indent=2))


# ------------------------------------------------------------------------------------------------ the benchmark
def run_bench(p: Preset, out: str | Path, *, policy: str = "", progress: bool = False,
              preset_name: str = "", report_only: bool = False) -> dict[str, Any]:
    """Run every (task, estimator, seed) of `p` sequentially; write results/, report.md and curves*.png.
    `report_only`: train nothing, report the runs already finished (a partial report of a long benchmark)."""
    from creditlab.registry import list_estimators

    out = Path(out)
    names = list(p.estimators) or runnable_estimators()
    unknown = sorted(set(names) - set(list_estimators()))
    if unknown:
        raise KeyError(f"unknown estimator(s) {unknown}; registered estimators: {list_estimators()}")
    for name in names:
        if missing_signals(name):
            raise ValueError(f"bench: estimator {name!r} needs {missing_signals(name)}, which a trainer run cannot "
                             f"produce; runnable estimators: {runnable_estimators()}")
    tasks = bench_tasks()
    unknown = sorted(set(p.tasks) - set(tasks))
    if unknown:
        raise KeyError(f"unknown bench task(s) {unknown}; bench tasks: {sorted(tasks)}")
    env = environment() | {"preset": preset_name, "settings": asdict(p) | {"estimators": names}, "policy": policy,
                           "tasks": {t: asdict(tasks[t]) for t in p.tasks}}
    env_path = out / "results" / "env.json"
    env_path.parent.mkdir(parents=True, exist_ok=True)
    if report_only and env_path.exists():  # report what the runs were recorded with
        env = json.loads(env_path.read_text())
    else:
        env_path.write_text(json.dumps(env, indent=2))
    t0 = time.perf_counter()
    jobs = [(t, e, s) for t in p.tasks for e in names for s in range(p.seeds)]
    for i, (t, e, s) in enumerate([] if report_only else jobs, start=1):
        task = tasks[t]
        base = policy or warm_start(t, task, out, task.sft_steps if p.sft_steps is None else p.sft_steps)
        cfg = run_config(p, task, base, e, s, out / "runs" / t / e / f"seed{s}", progress)
        what = run_one(cfg, out / "results" / t / e / f"seed{s}.jsonl")
        print(f"[{i}/{len(jobs)}] {t} {e} seed {s}: {what} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    summary = collect(out, p.tasks, names, p.seeds, p.steps)
    for t in p.tasks:
        if summary[t]:
            plot_task(out, t, summary[t], single=len(p.tasks) == 1)
    done = sum(len(seeds) for per_est in summary.values() for seeds in per_est.values())
    (out / "report.md").write_text(format_report(summary, p, env, partial=(done, len(jobs))))
    return summary


def total_samples(row: dict[str, Any]) -> int:
    """Every response generated up to this step: trainer samples + extra (MC) samples, both cumulative."""
    return int(row.get("samples", 0)) + int(row.get("samples_extra", 0))


def collect(out: Path, tasks: Sequence[str], names: Sequence[str], seeds: int,
            steps: int) -> dict[str, dict[str, list[dict]]]:
    """task -> estimator -> per finished seed {curve: (samples, accuracy), final, initial, train_s, wall_s}.
    Runs without results at `steps` are left out (estimators without any finished seed too)."""
    summary: dict[str, dict[str, list[dict]]] = {}
    for t in tasks:
        summary[t] = {}
        for e in names:
            seeds_out = []
            for s in range(seeds):
                path = out / "results" / t / e / f"seed{s}.jsonl"
                rows = [r for r in read_rows(path) if "eval/accuracy" in r]
                if not rows or rows[-1]["step"] != steps:
                    continue
                meta = json.loads(path.with_suffix(".json").read_text())
                seeds_out.append({"samples": [total_samples(r) for r in rows],
                                  "accuracy": [float(r["eval/accuracy"]) for r in rows],
                                  "final": float(rows[-1]["eval/accuracy"]), "initial": float(rows[0]["eval/accuracy"]),
                                  "train_s": meta["train_s"], "wall_s": meta["wall_s"]})
            if seeds_out:
                summary[t][e] = seeds_out
    return summary


def samples_to_target(samples: Sequence[int], accuracy: Sequence[float], target: float) -> int | None:
    """Samples at the first evaluation with accuracy >= target (None: never reached)."""
    return next((s for s, a in zip(samples, accuracy) if a >= target), None)


# ------------------------------------------------------------------------------------------------ output
def plot_task(out: Path, task: str, per_est: dict[str, list[dict]], single: bool) -> None:
    from creditlab.viz.plots import plot_curves

    curves = {e: [(s["samples"], s["accuracy"]) for s in seeds] for e, seeds in per_est.items()}
    path = plot_curves(curves, out / f"curves_{task}.png", title=f"{task}: held-out accuracy",
                       xlabel="samples (generated responses)", ylabel="held-out greedy accuracy")
    if single:
        shutil.copyfile(path, out / "curves.png")
        path.unlink()
    elif not (out / "curves.png").exists():
        shutil.copyfile(path, out / "curves.png")


def _mean_std(xs: Sequence[float]) -> str:
    a = np.asarray(xs, dtype=float)
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.3f} ± {sd:.3f}"


def format_table(per_est: dict[str, list[dict]], target: float) -> str:
    lines = [f"| estimator | scorer | seeds | initial acc | final acc (mean ± std) | samples to acc ≥ {target:g} | "
             "train s / run | wall s / run |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for e, seeds in per_est.items():
        hits = [samples_to_target(s["samples"], s["accuracy"], target) for s in seeds]
        reached = [h for h in hits if h is not None]
        to_target = f"{np.mean(reached):.0f} ({len(reached)}/{len(hits)})" if reached else f"— (0/{len(hits)})"
        lines.append(f"| {e} | {scorer_for(e)[0] or '-'} | {len(seeds)} | {np.mean([s['initial'] for s in seeds]):.3f} "
                     f"| {_mean_std([s['final'] for s in seeds])} | {to_target} | "
                     f"{np.mean([s['train_s'] for s in seeds]):.0f} | {np.mean([s['wall_s'] for s in seeds]):.0f} |")
    return "\n".join(lines)


def format_report(summary: dict[str, dict[str, list[dict]]], p: Preset, env: dict[str, Any],
                  partial: tuple[int, int] = (0, 0)) -> str:
    tasks = bench_tasks()
    done, total = partial
    probe = run_config(p, tasks[p.tasks[0]], "policy", "grpo", 0, Path("run"), False)  # the resolved sizes
    r, lr = probe.rollout, probe.optim.lr
    parts = ["# Learning benchmark" + (f" (partial: {done} of {total} runs finished)" if done < total else ""), "",
             f"preset `{env['preset'] or 'custom'}`: {p.steps} RL steps × {r.prompts_per_step} prompts × "
             f"{r.group_size} samples (max {r.max_new_tokens} tokens, lr {lr:g}) per run, seeds 0..{p.seeds - 1}, "
             f"held-out greedy accuracy on {p.eval_problems} test problems every {p.eval_every} steps (and at 0 and "
             "the end).",
             ""]
    for t, per_est in summary.items():
        task = tasks[t]
        sft_steps = task.sft_steps if p.sft_steps is None else p.sft_steps
        base = env["policy"] or (f"{task.policy} warm-started {sft_steps} SFT steps (warmstart/{t})" if sft_steps
                                 else task.policy)
        parts += [f"## {t} {task.task_kwargs}, policy: {base}", "", format_table(per_est, p.target), ""]
    parts += ["final acc: held-out accuracy at the last step, mean ± sample std over seeds. samples to target: "
              "generated responses (incl. any extra Monte-Carlo samples) at the first evaluation reaching the target, "
              "mean over the seeds that reached it (k/n reached); resolution is one evaluation interval. train s: "
              "summed time/step (rollout + signals + credit + update, no evaluation); wall s: the whole run incl. "
              "evaluations and checkpoints, summed over the attempts that completed (an interrupted attempt's time is "
              "lost; 0 when the run was finished before this benchmark recorded it). curves.png: held-out accuracy "
              "vs samples, mean line and ± std band over seeds.",
              "", f"git {env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}, torch {env['torch']}, "
              f"transformers {env['transformers']}, creditlab {env['creditlab']}, python {env['python']}, "
              f"{env['threads']} torch threads; full record in results/env.json.", ""]
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ CLI
def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Arguments of `creditlab bench` (explicit flags override the preset)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick", help="sizes and estimator set")
    parser.add_argument("--estimators", default="", help="comma-separated estimators ('all' = every runnable one)")
    parser.add_argument("--tasks", default="", help="comma-separated bench tasks (arith_chain; chain_sum runs smollm2)")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (0..N-1)")
    parser.add_argument("--steps", type=int, default=None, help="RL steps per run")
    parser.add_argument("--target", type=float, default=None, help="held-out accuracy for 'samples to target'")
    parser.add_argument("--with-smollm2", action="store_true", help="also run chain_sum with smollm2 (slow on CPU)")
    parser.add_argument("--policy", default="", help="use this policy directory for every run (no warm-start)")
    parser.add_argument("--out", default="", help="results directory (default runs/bench-<preset>)")
    parser.add_argument("--progress", action="store_true", help="per-run progress bars on stderr")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write report.md/curves.png from the runs already finished")


def preset_from_args(args: argparse.Namespace) -> Preset:
    p = PRESETS[args.preset]
    estimators = [x.strip() for x in args.estimators.split(",") if x.strip()]
    tasks = [x.strip() for x in args.tasks.split(",") if x.strip()] or list(p.tasks)
    if args.with_smollm2 and "chain_sum" not in tasks:
        tasks.append("chain_sum")
    changes: dict[str, Any] = {"tasks": tuple(tasks)}
    if estimators:
        changes["estimators"] = () if estimators == ["all"] else tuple(estimators)
    for name in ("seeds", "steps", "target"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return replace(p, **changes)


def run_bench_cli(args: argparse.Namespace) -> int:
    """`creditlab bench`: run (or complete) the benchmark and print the report."""
    out = Path(args.out or f"runs/bench-{args.preset}")
    run_bench(preset_from_args(args), out, policy=args.policy, progress=args.progress, preset_name=args.preset,
              report_only=args.report_only)
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.md, {out}/curves.png, {out}/results/")
    return 0
