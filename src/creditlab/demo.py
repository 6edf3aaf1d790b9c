"""`make demo`: warm-start `tiny` on `arith_chain`, then RL-train it with `grpo` and one other estimator and
print held-out greedy accuracy before and after each. Sized for a 2-core machine (~3-4 minutes in all).

The warm-start imitates a flawed demonstration set: in 60% of the demonstrations (a fixed set, chosen by a hash of
the problem) the answer line repeats the value before the last step instead of the final result
(`arith_chain`'s `sloppy_demos`). The supervised policy learns that slip as its most likely answer, so its greedy
accuracy starts low although its step arithmetic is often right; sampling still writes the right answer line
sometimes, and the verifier's reward (which knows nothing of the slip) lets RL unlearn it. The demo also counts
the greedy responses whose answer line is the slip, before and after, so you can see what RL fixed.

On this task with *clean* demonstrations, 30-60 RL steps do not raise this 2-layer character model's held-out
accuracy (we tried lr 1e-4 to 1e-3, temperature 0.7 and 1, KL, partial credit, 512 samples per step): what
remains after SFT is arithmetic spread over hundreds of facts, which RL at this scale and sample budget does
not improve faster than its noise. A systematic error shared by all problems is what a few RL steps can fix.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from creditlab.device import describe, device_info
from creditlab.policy import Policy, load_policy
from creditlab.rollout.hf import SamplingConfig, generate
from creditlab.tasks import Problem, get_task
from creditlab.tasks.arith_chain import parse_response
from creditlab.train.config import EvalConfig, LogConfig, OptimConfig, RolloutConfig, RunConfig, SFTConfig, TrainConfig
from creditlab.train.loop import train
from creditlab.train.sft import sft

TASK = "arith_chain"
TASK_KWARGS = json.dumps({"n_steps": 2, "ops": "+-", "instructions": False, "sloppy_demos": 0.6})
SFT_STEPS = 600
RL_STEPS = 60
EVAL_PROBLEMS = 128
# The demo's numbers depend on the torch thread count (the order of float reductions in matmuls) and on the CPU's
# kernels (AVX2 vs AVX-512 paths). The demo sets one thread: the tiny model's matmuls gain nothing from a second
# one, and with one thread the numbers do not depend on the core count, nor does a busy machine slow it down by
# making threads wait for each other (two threads on an oversubscribed 2-core machine ran the SFT ~30x slower).
DEMO_THREADS = 1


def demo_train_config(policy_dir: str, estimator: str, out_dir: str, seed: int, steps: int = RL_STEPS,
                      eval_problems: int = EVAL_PROBLEMS) -> TrainConfig:
    return TrainConfig(
        run=RunConfig(task=TASK, task_kwargs=TASK_KWARGS, policy=policy_dir, estimator=estimator, out_dir=out_dir,
                      seed=seed, steps=steps),
        rollout=RolloutConfig(prompts_per_step=16, group_size=8, temperature=1.0, max_new_tokens=40),
        optim=OptimConfig(lr=1e-4),  # 2e-4 rose too but less steadily; 1e-3 collapsed warm-started policies
        eval=EvalConfig(eval_every=20, eval_problems=eval_problems),
        log=LogConfig(checkpoint_every=steps, progress=True),
    )


def answer_slips(policy: Policy, problems: list[Problem]) -> int:
    """How many greedy responses answer with the demonstrations' slip (the value before the last step)."""
    batch = generate(policy, [policy.format_prompt(p.prompt) for p in problems], 1,
                     SamplingConfig(temperature=0.0, max_new_tokens=40), seed=0)
    return sum(parse_response(text).answer == p.meta["gold_steps"][-1][0] for p, text in zip(problems, batch.texts))


MARKER = ".creditlab-demo"  # written into --out-root: only a directory holding it is ever cleaned by the demo


def demo_dirs(other: str) -> tuple[str, ...]:
    """The subdirectories of --out-root the demo writes (and replaces on a rerun)."""
    return ("sft-tiny", "grpo", other)


def check_demo_args(out_root: str, other: str, *, steps: int = RL_STEPS, eval_problems: int = EVAL_PROBLEMS) -> None:
    """Refuse bad demo options before any work: the other estimator must be registered, differ from grpo and run on
    what the demo produces (no scorer, no critic); --out-root must be new, empty, or a previous demo's output."""
    from creditlab.registry import get_spec, list_estimators
    from creditlab.signals.produce import PRODUCERS

    try:
        needs = get_spec(other).needs
    except KeyError:
        raise ValueError(f"--other-estimator: unknown estimator {other!r}; registered: {list_estimators()}") from None
    if other == "grpo":
        raise ValueError("--other-estimator must differ from grpo, which the demo always trains")
    missing = [n for n in needs if n not in PRODUCERS and n not in ROLLOUT_FIELDS]
    if missing:
        raise ValueError(f"--other-estimator {other} needs {missing}, which the demo cannot produce (it runs no "
                         f"scorer or critic); try `creditlab train --estimator {other} --scorer ...`")
    demo_train_config("tiny", other, "", 0, steps, eval_problems).validate()
    root = Path(out_root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"--out-root {root} is a file, not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).is_file():
        raise ValueError(f"--out-root {root} is not empty and is not the output of an earlier demo (no {MARKER}): "
                         "the demo only replaces its own output; pick a new or empty directory")


# Batch fields the rollout fills itself (`creditlab.rollout.hf.generate`) or the trainer computes (ref_logprobs).
ROLLOUT_FIELDS = ("response_ids", "logprobs", "entropies", "certainty", "token_logits", "prompt_ids",
                  "prompt_mask", "texts", "ref_logprobs")


def run_demo(out_root: str = "runs/demo", seed: int = 0, other: str = "tempo", *, sft_steps: int = SFT_STEPS,
             rl_steps: int = RL_STEPS, eval_problems: int = EVAL_PROBLEMS) -> list[dict]:
    """Run the demo and print its table; the size knobs exist for the smoke test. Sets `DEMO_THREADS` torch threads
    (and leaves them set) so that the printed numbers do not depend on the machine's core count.

    Writes into `out_root` only: the demo's own subdirectories (`demo_dirs`) are replaced when `out_root` holds the
    marker of an earlier demo; any other non-empty directory is refused (`check_demo_args`)."""
    check_demo_args(out_root, other, steps=rl_steps, eval_problems=eval_problems)
    torch.set_num_threads(DEMO_THREADS)
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by `creditlab demo`; the demo replaces its own subdirectories here\n")
    for name in demo_dirs(other):
        if (root / name).is_dir() and not (root / name).is_symlink():
            shutil.rmtree(root / name)
    t0 = time.perf_counter()
    held_out = get_task(TASK, **json.loads(TASK_KWARGS)).problems("test", eval_problems, seed)  # what train() uses
    print(f"\n[1/3] warm-starting tiny on {TASK} ({sft_steps} supervised steps on demonstrations whose answer line "
          "is a slip 60% of the time) ...", flush=True)
    s = sft(SFTConfig(task=TASK, task_kwargs=TASK_KWARGS, policy="tiny", out_dir=str(root / "sft-tiny"), seed=seed,
                      steps=sft_steps, eval_problems=eval_problems, max_new_tokens=40))
    print(f"      held-out greedy accuracy after warm-start: {s['accuracy']:.3f} ({s['seconds']:.0f} s)", flush=True)
    slips = {"sft": answer_slips(load_policy(s["out_dir"]), held_out)}
    results = []
    for i, est in enumerate(("grpo", other), start=2):
        print(f"\n[{i}/3] RL with {est} for {rl_steps} steps ...", flush=True)
        r = train(demo_train_config(s["out_dir"], est, str(root / est), seed, rl_steps, eval_problems))
        slips[est] = answer_slips(load_policy(str(Path(r["run_dir"]) / "policy")), held_out)
        results.append({"estimator": est, **r})
    n = len(held_out)
    print(f"\nheld-out greedy accuracy on {TASK} {TASK_KWARGS}, {n} problems (total {time.perf_counter() - t0:.0f} s)")
    print(f"{'estimator':<12} {'before':>7} {'after':>7}  {'answer-line slips':>17}  run directory")
    for r in results:
        before, after = slips["sft"], slips[r["estimator"]]
        print(f"{r['estimator']:<12} {r['initial_accuracy']:>7.3f} {r['final_accuracy']:>7.3f}  "
              f"{before:>7} -> {after:<7}  {r['run_dir']}")
    print(f"(warm-started policy: {root / 'sft-tiny'}; `creditlab inspect <run directory>` shows where the credit "
          "went)")
    kernels = device_info("cpu")["cpu"]["torch_capability"]
    print(f"(measured on {describe('cpu')}, torch kernels {kernels}: the numbers depend on the thread count and on "
          "the kernels' vector width, AVX2 or AVX-512)")
    return results
