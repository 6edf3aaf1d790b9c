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
column, which already includes the extra samples components charge with `ctx.count("samples/extra", n)`
(Monte-Carlo continuations, judge generations). Wall-clock: the cumulative `time/step` (rollout, signals incl.
continuations and critic passes, credit, update; evaluations and checkpoints excluded).

`--results DIR` keeps the results (and report.md, curves*.png) elsewhere than under `--out`: the `smollm2` preset
writes them to `benchmarks/results/smollm2/`, to be committed without checkpoints, so `--report-only` rebuilds the
report in a fresh clone, and a rerun skips every run whose committed metrics are finished with the same settings
(each result keeps its run's config next to it as seed<k>.config.json).

Estimators: a preset with no estimator list takes every registered estimator the single-turn trainer can feed,
decided when the benchmark starts (families registered later are picked up): fields the rollout, the signal
producers or the step scorer fill count as available; an estimator needing anything else is tried for one tiny
step (`probe`), which succeeds when a component (critic, Monte-Carlo, attention ...) fills it. `oracle=False`
presets also skip estimators that read oracle step labels, and score steps with the implicit PRM instead of the
task's oracle. Skipped estimators are listed in the report with the reason.
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

from creditlab.bench.stats import Paired, paired_differences
from creditlab.device import device_info, resolve_device
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


# The smollm2 preset's task, picked with benchmarks/smollm2_headroom.py (docs/benchmarks.md): greedy held-out accuracy
# of the untrained SmolLM2-135M-Instruct (64 problems) was 0.14 on one-digit two-term chain_sum, 0.078 on one-digit
# three-term, 0.0 on two-digit (it repeats the first operand) and 0.03 on basic_arithmetic. Three-term sums were
# the first choice, but GRPO did not move them in 20 steps of this preset (0.070 -> 0.047, 0.063, 0.086, 0.070 at
# steps 5-20, seed 0), so the preset uses two-term sums, where GRPO climbs over ~10 steps (0.16 -> ~0.75 in the
# vs_trl recipe): the comparison is how fast each method gets there (samples to 0.5), over 12 steps.
SMOLLM2_TASK = BenchTask("chain_sum", json.dumps({"digits": 1, "terms": 2}), "smollm2", 0)


def bench_tasks() -> dict[str, BenchTask]:
    return {"arith_chain": BenchTask(BENCH_TASK, BENCH_TASK_KWARGS, "tiny", BENCH_SFT_STEPS),
            "chain_sum": BenchTask("chain_sum", "{}", "smollm2", 0),
            "smollm2": SMOLLM2_TASK}


@dataclass(frozen=True)
class Preset:
    estimators: tuple[str, ...]  # () = every registered estimator the trainer can feed (`select_estimators`)
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
    oracle: bool = True  # False: skip estimators reading oracle labels; step scores from the implicit PRM
    lr: float | None = None
    temperature: float | None = None
    results: str = ""  # where results/report/curves go ("" = <out>/results and <out>)


PRESETS = {
    # ~15 min on 2 idle cores: SFT ~40 s, then 12 runs × 20 steps at ~2 s per step plus 5 evaluations each
    "quick": Preset(("grpo", "rloo", "tempo", "hicra", "ucas", "ktae"), ("arith_chain",), seeds=2, steps=20),
    "full": Preset((), ("arith_chain",), seeds=3, steps=60, eval_every=10, target=0.3),
    # tests / smoke checks: untrained tiny, seconds per run
    "micro": Preset(("grpo",), ("arith_chain",), seeds=1, steps=2, prompts_per_step=4, group_size=4,
                    max_new_tokens=24, eval_every=2, eval_problems=8, target=0.1, sft_steps=0),
    # The real-model benchmark: SmolLM2-135M-Instruct, every estimator that needs no oracle, 3 seeds, lr and
    # sizes of the README's SmolLM2 recipe (group 8 so that group-structured credit has something to work with).
    # Results are committed under benchmarks/results/smollm2/.
    "smollm2": Preset((), ("smollm2",), seeds=3, steps=12, prompts_per_step=8, group_size=8, max_new_tokens=40,
                      eval_every=3, eval_problems=128, target=0.5, oracle=False, lr=1e-5, temperature=1.0,
                      results="benchmarks/results/smollm2"),
}


# ------------------------------------------------------------------------------------------------ estimators
ORACLE_FIELDS = ("step_labels",)  # fields that only a task's oracle can fill


def scorer_for(name: str, oracle: bool = True) -> tuple[str, str]:
    """(scorer, scorer_kwargs JSON) for an estimator: the implicit PRM when it reads prm_logprobs, the oracle
    scorer when it reads step_rewards (the implicit PRM when `oracle` is False), none (the task's producers)
    otherwise."""
    needs = _needs(name)
    if "prm_logprobs" in needs or ("step_rewards" in needs and not oracle):
        return "implicit", json.dumps(SCORER_KWARGS.get(name, {}))
    if "step_rewards" in needs:
        return "oracle", json.dumps(SCORER_KWARGS.get(name, {}))
    return "", "{}"


def _needs(name: str) -> tuple[str, ...]:
    from creditlab.registry import get_spec

    return get_spec(name).needs


def missing_signals(name: str, oracle: bool = True) -> list[str]:
    """Fields `name` needs that neither the rollout, the signal producers nor its step scorer fill (empty: the
    estimator can be benchmarked; otherwise only a trainer component can feed it, see `probe`)."""
    from creditlab.signals.produce import PRODUCERS

    scorer, _ = scorer_for(name, oracle)
    can = {*ROLLOUT_FIELDS, *PRODUCERS, *SCORER_FIELDS.get(scorer, ())}
    return [f for f in _needs(name) if f not in can]


def oracle_needs(name: str) -> list[str]:
    """Oracle-only fields `name` reads (an `oracle=False` benchmark skips it)."""
    return [f for f in _needs(name) if f in ORACLE_FIELDS]


def runnable_estimators(oracle: bool = True) -> list[str]:
    """Every registered estimator whose needs the trainer fills without a component (e.g. not gae: it needs a
    critic); with `oracle=False` also none that reads oracle labels. `select_estimators` adds probed ones."""
    from creditlab.registry import list_estimators

    return [n for n in list_estimators() if not missing_signals(n, oracle) and (oracle or not oracle_needs(n))]


def probe(name: str, task: BenchTask, oracle: bool = True) -> str:
    """Try `name` for one tiny trainer step (tiny policy, 2 prompts × 4 samples) on `task`: "" when it ran, else
    the first line of the error (e.g. the registry's "needs RolloutBatch.values ... produced by a critic")."""
    import tempfile

    from creditlab.train.loop import train

    with tempfile.TemporaryDirectory(prefix="creditlab-probe-") as tmp:
        p = Preset((name,), (), seeds=1, steps=1, prompts_per_step=2, group_size=4, max_new_tokens=8,
                   eval_every=1, eval_problems=1, oracle=oracle)
        cfg = run_config(p, replace(task, policy="tiny"), "tiny", name, 0, Path(tmp) / "run", False)
        cfg.log = replace(cfg.log, sample_every=0)
        try:
            train(cfg)
        except Exception as e:  # any failure means this trainer cannot run it here; the note says why
            return (str(e).splitlines() or [type(e).__name__])[0][:200]
    return ""


def select_estimators(p: Preset, tasks: dict[str, BenchTask]) -> tuple[list[str], dict[str, str]]:
    """(estimators to run, skipped -> reason) for preset `p`: its list, or every registered estimator the trainer
    can feed (computed now, so families registered after this module was written are included)."""
    from creditlab.registry import list_estimators

    if p.estimators:
        return list(p.estimators), {}
    run, skipped = [], {}
    for name in list_estimators():
        if not p.oracle and oracle_needs(name):
            skipped[name] = f"reads oracle labels ({', '.join(oracle_needs(name))})"
        elif not missing_signals(name, p.oracle):
            run.append(name)
        else:
            why = probe(name, tasks[p.tasks[0]], p.oracle)
            if why:
                skipped[name] = why
            else:
                run.append(name)
    return run, skipped


# ------------------------------------------------------------------------------------------------ environment
def environment(device: str = "auto") -> dict[str, Any]:
    """git commit + dirty flag of the creditlab checkout, package versions, python, platform, torch threads, and
    where the runs compute (`creditlab.device.device_info`: device, CPU model and flags, GPU name)."""
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
            "python": platform.python_version(), "platform": platform.platform(), "threads": torch.get_num_threads(),
            **device_info(resolve_device(device))}


# ------------------------------------------------------------------------------------------------ runs
def run_config(p: Preset, task: BenchTask, policy: str, estimator: str, seed: int, run_dir: Path,
               progress: bool, device: str = "auto") -> Any:
    """The TrainConfig of one benchmark run: `bench_train_config` with the preset's sizes."""
    cfg = bench_train_config(policy, estimator, str(run_dir), seed, steps=p.steps)
    scorer, scorer_kwargs = scorer_for(estimator, p.oracle)
    cfg.run = replace(cfg.run, task=task.task, task_kwargs=task.task_kwargs, scorer=scorer,
                      scorer_kwargs=scorer_kwargs, device=device)
    sizes = {"prompts_per_step": p.prompts_per_step, "group_size": p.group_size, "max_new_tokens": p.max_new_tokens,
             "temperature": p.temperature}
    cfg.rollout = replace(cfg.rollout, **{k: v for k, v in sizes.items() if v is not None})
    if p.lr is not None:
        cfg.optim = replace(cfg.optim, lr=p.lr)
    if "values" in _needs(estimator):  # critic estimators: a value head on the policy, warmed up for 2 steps (the
        # same head without warmup collapsed ma_rlhf to 0 accuracy on SmolLM2: benchmarks/results/smollm2/partial/)
        cfg.critic = replace(cfg.critic, critic="head", critic_lr=1e-3, critic_coef=0.1, critic_warmup=2,
                             critic_epochs=4)
    cfg.eval = replace(cfg.eval, eval_every=p.eval_every, eval_problems=p.eval_problems)
    cfg.log = replace(cfg.log, checkpoint_every=5, tensorboard=False, progress=progress)  # and at the end
    return cfg


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_finished(path: Path, steps: int) -> bool:
    """The run (a run directory, or a metrics .jsonl) logged step == steps together with its final evaluation."""
    rows = read_rows(path if path.suffix == ".jsonl" else path / "metrics.jsonl")
    return bool(rows) and rows[-1]["step"] == steps and "eval/accuracy" in rows[-1]


def _comparable(d: dict[str, Any]) -> dict[str, Any]:
    """A run's config without what may change between attempts (steps, resume, progress display), with every option
    the run's creditlab did not have yet at its default (a default reproduces what the run did)."""
    from creditlab.train.config import TrainConfig

    out = TrainConfig.from_dict(json.loads(json.dumps(d))).to_dict()  # options added since: their defaults
    for section, key in (("run", "steps"), ("run", "resume"), ("log", "progress")):
        out.get(section, {}).pop(key, None)
    return out


def check_same_settings(run_dir: Path, cfg: Any, saved: Path | None = None) -> None:
    """Refuse to skip or resume a run that was made with other settings (e.g. after the bench settings changed).
    `saved`: the config file to compare (default run_dir/config.json). The run directory and device may differ."""
    saved = saved or run_dir / "config.json"
    if not saved.exists():
        return
    theirs, ours = _comparable(json.loads(saved.read_text())), _comparable(cfg.to_dict())
    for d in (theirs, ours):
        d.get("run", {}).pop("out_dir", None)
        d.get("run", {}).pop("device", None)
    if theirs != ours:
        raise ValueError(f"bench: {saved} was made with other settings than this benchmark's "
                         f"(compare that config); pick a new --out / --results or delete that run")


def run_one(cfg: Any, result: Path) -> str:
    """Train (or resume, or skip) one run and copy its metrics to `result` (.jsonl, plus a .json summary).
    Returns what happened: "skipped", "resumed" or "trained"."""
    from creditlab.train.loop import train

    run_dir = Path(cfg.run.out_dir)
    check_same_settings(run_dir, cfg)
    result.parent.mkdir(parents=True, exist_ok=True)
    meta_path, saved_cfg = result.with_suffix(".json"), result.with_suffix(".config.json")
    check_same_settings(result.parent, cfg, saved_cfg)
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"wall_s": 0.0}
    if not is_finished(run_dir, cfg.run.steps) and is_finished(result, cfg.run.steps) and saved_cfg.exists():
        return "skipped (committed results)"  # e.g. a fresh clone of the results without the run directories
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
    shutil.copyfile(run_dir / "config.json", saved_cfg)
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
def run_bench(p: Preset, out: str | Path, *, policy: str = "", progress: bool = False, preset_name: str = "",
              report_only: bool = False, results: str | Path = "", device: str = "auto") -> dict[str, Any]:
    """Run every (task, estimator, seed) of `p` sequentially; write results, report.md and curves*.png.
    `report_only`: train nothing, report the runs already finished (a partial report of a long benchmark).
    `results`: where results and report go (default `p.results`, else <out>/results with the report in <out>)."""
    out = Path(out)
    res = Path(results or p.results or out / "results")
    report_dir = res if (results or p.results) else out
    tasks = bench_tasks()
    unknown = sorted(set(p.tasks) - set(tasks))
    if unknown:
        raise KeyError(f"unknown bench task(s) {unknown}; bench tasks: {sorted(tasks)}")
    env_path = res / "env.json"
    if report_only and env_path.exists():  # report what the runs were recorded with (or the estimators asked for)
        env = json.loads(env_path.read_text())
        names, skipped = list(p.estimators) or env["settings"]["estimators"], env.get("skipped", {})
    else:
        names, skipped = _checked_estimators(p, tasks)
        env = environment(device) | {"preset": preset_name, "settings": asdict(p) | {"estimators": names},
                                     "skipped": skipped, "policy": policy,
                                     "tasks": {t: asdict(tasks[t]) for t in p.tasks}}
        env_path.parent.mkdir(parents=True, exist_ok=True)
        if not report_only:
            env_path.write_text(json.dumps(env, indent=2))
    t0 = time.perf_counter()
    jobs = [(t, e, s) for t in p.tasks for e in names for s in range(p.seeds)]
    for i, (t, e, s) in enumerate([] if report_only else jobs, start=1):
        task = tasks[t]
        base = policy or warm_start(t, task, out, task.sft_steps if p.sft_steps is None else p.sft_steps)
        cfg = run_config(p, task, base, e, s, out / "runs" / t / e / f"seed{s}", progress, device)
        what = run_one(cfg, res / t / e / f"seed{s}.jsonl")
        print(f"[{i}/{len(jobs)}] {t} {e} seed {s}: {what} ({time.perf_counter() - t0:.0f} s so far)", flush=True)
    summary = collect(res, p.tasks, names, p.seeds, p.steps)
    report_dir.mkdir(parents=True, exist_ok=True)
    for t in p.tasks:
        if summary[t]:
            plot_task(report_dir, t, summary[t], single=len(p.tasks) == 1)
    done = sum(len(seeds) for per_est in summary.values() for seeds in per_est.values())
    (report_dir / "report.md").write_text(format_report(summary, p, env, partial=(done, len(jobs))))
    return summary


def _checked_estimators(p: Preset, tasks: dict[str, BenchTask]) -> tuple[list[str], dict[str, str]]:
    """The preset's estimators (explicit ones must exist and be runnable), and the skipped ones with reasons."""
    from creditlab.registry import list_estimators

    names, skipped = select_estimators(p, tasks)
    unknown = sorted(set(names) - set(list_estimators()))
    if unknown:
        raise KeyError(f"unknown estimator(s) {unknown}; registered estimators: {list_estimators()}")
    for name in names if p.estimators else ():
        if not p.oracle and oracle_needs(name):
            raise ValueError(f"bench: estimator {name!r} reads oracle labels ({', '.join(oracle_needs(name))}), "
                             f"which this preset does not use; runnable estimators: {runnable_estimators(p.oracle)}")
        if missing_signals(name, p.oracle):  # only a trainer component can feed it: try one tiny step
            why = probe(name, tasks[p.tasks[0]], p.oracle)
            if why:
                raise ValueError(f"bench: estimator {name!r} cannot run in this benchmark's trainer: {why}")
    return names, skipped


def total_samples(row: dict[str, Any]) -> int:
    """Every response generated up to this step: the trainer's cumulative `samples`, which includes the extra
    samples (Monte-Carlo continuations, ...) components charge with `samples/extra`."""
    return int(row.get("samples", 0))


def collect(res: Path, tasks: Sequence[str], names: Sequence[str], seeds: int,
            steps: int) -> dict[str, dict[str, list[dict]]]:
    """task -> estimator -> per finished seed {seed, samples, seconds (cumulative time/step), accuracy at each
    evaluation, final, initial, train_s, wall_s}. Runs without results at `steps` are left out (estimators
    without any finished seed too). `res`: the results directory."""
    summary: dict[str, dict[str, list[dict]]] = {}
    for t in tasks:
        summary[t] = {}
        for e in names:
            seeds_out = []
            for s in range(seeds):
                path = res / t / e / f"seed{s}.jsonl"
                all_rows = read_rows(path)
                rows = [r for r in all_rows if "eval/accuracy" in r]
                if not rows or rows[-1]["step"] != steps:
                    continue
                meta = json.loads(path.with_suffix(".json").read_text())
                elapsed = np.cumsum([r.get("time/step", 0.0) for r in all_rows])  # [rows] train seconds so far
                at = {r["step"]: float(x) for r, x in zip(all_rows, elapsed)}
                seeds_out.append({"seed": s, "samples": [total_samples(r) for r in rows],
                                  "seconds": [at[r["step"]] for r in rows],
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
    """curves[_<task>].png (accuracy vs samples) and curves_time[_<task>].png (accuracy vs train seconds)."""
    from creditlab.viz.plots import plot_curves

    for key, xlabel, stem in (("samples", "samples (generated responses, extra work included)", "curves"),
                              ("seconds", "train seconds (time/step summed, evaluations excluded)", "curves_time")):
        curves = {e: [(s[key], s["accuracy"]) for s in seeds] for e, seeds in per_est.items()}
        path = plot_curves(curves, out / f"{stem}_{task}.png", title=f"{task}: held-out accuracy",
                           xlabel=xlabel, ylabel="held-out greedy accuracy")
        if single:
            shutil.copyfile(path, out / f"{stem}.png")
            path.unlink()
        elif not (out / f"{stem}.png").exists():
            shutil.copyfile(path, out / f"{stem}.png")


def _mean_std(xs: Sequence[float]) -> str:
    a = np.asarray(xs, dtype=float)
    sd = a.std(ddof=1) if len(a) > 1 else 0.0
    return f"{a.mean():.3f} ± {sd:.3f}"


def curve_mean(seed: dict) -> float:
    """Mean held-out accuracy over a run's evaluations after step 0 (area under the accuracy-vs-step curve)."""
    return float(np.mean(seed["accuracy"][1:] or seed["accuracy"]))


def format_table(per_est: dict[str, list[dict]], target: float, oracle: bool = True) -> str:
    lines = [f"| estimator | scorer | seeds | initial acc | final acc (mean ± std) | mean acc over evals | "
             f"samples to acc ≥ {target:g} | train s / run | wall s / run |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e, seeds in per_est.items():
        hits = [samples_to_target(s["samples"], s["accuracy"], target) for s in seeds]
        reached = [h for h in hits if h is not None]
        to_target = f"{np.mean(reached):.0f} ({len(reached)}/{len(hits)})" if reached else f"— (0/{len(hits)})"
        lines.append(f"| {e} | {scorer_for(e, oracle)[0] or '-'} | {len(seeds)} | "
                     f"{np.mean([s['initial'] for s in seeds]):.3f} | {_mean_std([s['final'] for s in seeds])} | "
                     f"{_mean_std([curve_mean(s) for s in seeds])} | {to_target} | "
                     f"{np.mean([s['train_s'] for s in seeds]):.0f} | {np.mean([s['wall_s'] for s in seeds]):.0f} |")
    return "\n".join(lines)


def format_paired(per_est: dict[str, list[dict]], baseline: str = "grpo") -> str:
    """Each estimator minus `baseline` on the same seeds: final accuracy and mean accuracy over evaluations."""
    if baseline not in per_est or len(per_est) < 2:
        return ""
    base = {s["seed"]: s for s in per_est[baseline]}
    lines = [f"| estimator − {baseline} | seeds | final acc: per-seed diffs | mean ± std | 95% t-interval | +/0/− | "
             "sign p | mean acc: mean ± std | +/0/− | sign p |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for e, seeds in per_est.items():
        if e == baseline:
            continue
        mine = {s["seed"]: s for s in seeds}
        fin = paired_differences({k: v["final"] for k, v in mine.items()}, {k: v["final"] for k, v in base.items()})
        auc = paired_differences({k: curve_mean(v) for k, v in mine.items()},
                                 {k: curve_mean(v) for k, v in base.items()})
        if not fin.n:
            continue
        lo, hi = fin.ci95
        interval = f"[{lo:+.3f}, {hi:+.3f}]" if fin.n > 1 else "—"  # one seed: no spread, no interval
        lines.append(f"| {e} | {fin.n} | {', '.join(f'{d:+.3f}' for d in fin.diffs)} | {fin.mean:+.3f} ± "
                     f"{_sd(fin)} | {interval} | {'/'.join(map(str, fin.wins))} | {fin.sign_p:.2f} | "
                     f"{auc.mean:+.3f} ± {_sd(auc)} | {'/'.join(map(str, auc.wins))} | {auc.sign_p:.2f} |")
    return "\n".join(lines)


def _sd(d: Paired) -> str:
    return f"{d.std:.3f}" if d.n > 1 else "—"  # one seed has no spread


def format_report(summary: dict[str, dict[str, list[dict]]], p: Preset, env: dict[str, Any],
                  partial: tuple[int, int] = (0, 0)) -> str:
    tasks = bench_tasks()
    done, total = partial
    probe_cfg = run_config(p, tasks[p.tasks[0]], "policy", "grpo", 0, Path("run"), False)  # the resolved sizes
    r, lr = probe_cfg.rollout, probe_cfg.optim.lr
    parts = ["# Learning benchmark" + (f" (partial: {done} of {total} runs finished)" if done < total else ""), "",
             f"preset `{env['preset'] or 'custom'}`: {p.steps} RL steps × {r.prompts_per_step} prompts × "
             f"{r.group_size} samples (max {r.max_new_tokens} tokens, temperature {r.temperature:g}, lr {lr:g}) per "
             f"run, seeds 0..{p.seeds - 1}, held-out greedy accuracy on {p.eval_problems} test problems every "
             f"{p.eval_every} steps (and at 0 and the end)."
             + ("" if p.oracle else " No oracle: estimators that read oracle step labels are skipped, and step "
                "scores come from the implicit PRM (scorer `implicit`)."),
             ""]
    for t, per_est in summary.items():
        task = tasks[t]
        sft_steps = task.sft_steps if p.sft_steps is None else p.sft_steps
        base = env["policy"] or (f"{task.policy} warm-started {sft_steps} SFT steps (warmstart/{t})" if sft_steps
                                 else task.policy)
        parts += [f"## {t}: `{task.task}` {task.task_kwargs}, policy: {base}", "",
                  format_table(per_est, p.target, p.oracle), ""]
        paired = format_paired(per_est)
        if paired:
            parts += ["Paired with `grpo` on the same seeds (same initial policy and problems per seed):", "", paired,
                      ""]
    if env.get("skipped"):
        parts += ["Skipped: " + "; ".join(f"`{k}`: {v}" for k, v in env["skipped"].items()) + ".", ""]
    parts += ["final acc: held-out accuracy at the last step, mean ± sample std over seeds. mean acc over evals: "
              "the mean of a run's held-out accuracies after step 0 (area under its learning curve). samples to "
              "target: generated responses (extra Monte-Carlo/judge samples included) at the first evaluation "
              "reaching the target, mean over the seeds that reached it (k/n reached); resolution is one evaluation "
              "interval. Paired: per-seed differences estimator − grpo; 95% t-interval: of the mean difference "
              "(Student t, n − 1 degrees of freedom; with 3 seeds it spans ±2.5 std: what the seeds cannot rule "
              "out; it assumes normal differences, which 3 seeds cannot check, and with k estimators compared to "
              "grpo about k/20 intervals miss 0 by chance alone); +/0/− counts seeds; sign p: exact two-sided "
              "sign test (with 3 seeds it cannot go below 0.25, so 3 seeds show a direction, never significance). "
              "train s: summed time/step (rollout + signals + credit + update incl. critic/continuation work, no "
              "evaluation); wall s: the whole run incl. evaluations and checkpoints, summed over the attempts that "
              "completed (an interrupted attempt's time is lost; 0 when the run was finished before this benchmark "
              "recorded it). curves.png: held-out accuracy vs samples; curves_time.png: vs train seconds; mean line "
              "and ± std band over seeds.", "", environment_line(env), ""]
    return "\n".join(parts)


def environment_line(env: dict[str, Any]) -> str:
    cpu = env.get("cpu", {})
    where = env.get("gpu") or (f"{cpu.get('model', '?')} ({', '.join(cpu.get('flags', [])) or 'flags unknown'})"
                               if cpu else "an unrecorded CPU")
    return (f"Measured on {env.get('device', 'cpu')}: {where}, {env['threads']} torch threads; git "
            f"{env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}, torch {env['torch']}, transformers "
            f"{env['transformers']}, creditlab {env['creditlab']}, python {env['python']}; full record in env.json.")


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
    parser.add_argument("--results", default="", help="results + report directory (default: the preset's, e.g. "
                                                      "benchmarks/results/smollm2, else <out>/results)")
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cpu, cuda[:N]")


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
    p = preset_from_args(args)
    if args.results:
        p = replace(p, results=args.results)
    elif args.out and p.results:  # an explicit --out keeps everything under it
        p = replace(p, results="")
    run_bench(p, out, policy=args.policy, progress=args.progress, preset_name=args.preset,
              report_only=args.report_only, device=args.device)
    report_dir = Path(p.results) if p.results else out
    print((report_dir / "report.md").read_text())
    print(f"wrote {report_dir}/report.md, {report_dir}/curves.png, {Path(p.results or out / 'results')}/")
    return 0
