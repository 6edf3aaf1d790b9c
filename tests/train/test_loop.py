"""End-to-end trainer tests on the tiny policy: CLI training, exact resume, crash-safe checkpoints."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from creditlab.cli import main
from creditlab.policy import load_policy
from creditlab.train.loop import TrainState, load_checkpoint, save_checkpoint
from creditlab.train.rundir import open_run_dir

TINY = ["--task", "arith_chain", "--task-kwargs", '{"n_steps": 2}', "--policy", "tiny",
        "--prompts-per-step", "4", "--group-size", "4", "--max-new-tokens", "24", "--eval-problems", "8",
        "--eval-every", "2", "--no-tensorboard", "--no-progress", "--lr", "1e-3"]


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_tiny_with_finite_losses_and_changed_parameters(tmp_path):
    out = tmp_path / "run"
    # ucas shapes credit even in zero-signal groups (a from-scratch policy solves nothing), so weights must move
    assert main(["train", *TINY, "--estimator", "ucas", "--steps", "3", "--out-dir", str(out)]) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows[1:]:
        for k in ("loss/pg", "loss/total", "reward/mean", "pg/clipfrac", "policy/entropy", "credit/adv_mean"):
            assert isinstance(r[k], float) and r[k] == r[k] and abs(r[k]) != float("inf"), k
        assert r["samples"] == 16 * r["step"]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[-1]
    before = load_policy("tiny", seed=0).model.state_dict()
    after = load_policy(str(out / "policy")).model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "latest").exists() and list(out.glob("samples/step_*.json"))


def test_bf16_sampling_and_update_train_with_finite_losses(tmp_path):
    out = tmp_path / "bf16"
    args = [*TINY, "--estimator", "grpo", "--steps", "2", "--out-dir", str(out), "--bf16", "--update-bf16",
            "--minibatches", "2"]  # two minibatches: old log-probs come from a separate no-grad bf16 forward
    assert main(["train", *args]) == 0
    rows = read_metrics(out)[1:]
    assert len(rows) == 2
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss/pg", "loss/total", "pg/approx_kl", "grad_norm"))


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    common = [*TINY, "--estimator", "rloo", "--checkpoint-every", "2", "--warmup-steps", "3"]
    assert main(["train", *common, "--steps", "4", "--out-dir", str(tmp_path / "straight")]) == 0
    assert main(["train", *common, "--steps", "2", "--out-dir", str(tmp_path / "split")]) == 0
    assert main(["train", *common, "--steps", "4", "--out-dir", str(tmp_path / "split"), "--resume"]) == 0
    straight, split = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "split")
    assert [r["step"] for r in split] == [0, 1, 2, 3, 4]
    assert _strip_times(straight) == _strip_times(split)
    assert [r["optim/lr"] for r in split[1:]] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])  # warmup resumed


def test_existing_run_dir_needs_resume(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--steps", "1", "--out-dir", out]) == 0
    assert main(["train", *TINY, "--steps", "1", "--out-dir", out]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["--estimator", "nope"], "grpo"),
    (["--task", "nope"], "arith_chain"),
    (["--policy", "nope"], "tiny"),
])
def test_unknown_names_list_valid_ones(tmp_path, capsys, argv, needle):
    args = [*TINY, "--steps", "1", "--out-dir", str(tmp_path / "r")]
    flag, value = argv
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and needle in err


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optim = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, TrainState(step=1, samples=8), model, optim)
    with torch.no_grad():
        model.weight.add_(1.0)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, TrainState(step=2, samples=16), model, optim)
    monkeypatch.undo()
    fresh = torch.nn.Linear(3, 2)
    state = load_checkpoint(tmp_path, fresh, torch.optim.AdamW(fresh.parameters()))
    assert state.step == 1


KILL_SCRIPT = """
import sys, torch
from pathlib import Path
from creditlab.train.checkpoint import TrainState, save_checkpoint  # torch only: starts fast
model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
optim = torch.optim.AdamW(model.parameters())
step = 0
while True:
    step += 1
    with torch.no_grad():
        model[0].weight.fill_(float(step))
    save_checkpoint(Path(sys.argv[1]), TrainState(step=step, samples=step), model, optim)
"""


def test_sigkill_mid_checkpoint_never_leaves_an_unreadable_checkpoint(tmp_path):
    for i in range(6):
        run_dir = tmp_path / f"r{i}"
        run_dir.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(run_dir)])
        deadline = time.time() + 120  # a loaded machine can take long to start the process
        while not (run_dir / "latest").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (run_dir / "latest").exists(), "the writer published no checkpoint in time"
        time.sleep(0.05 + 0.13 * i)  # land at different points of the write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
        state = load_checkpoint(run_dir, model, torch.optim.AdamW(model.parameters()))
        assert state.step >= 1
        assert float(model[0].weight[0, 0].detach()) == float(state.step)  # the weights belong to that step
        open_run_dir(run_dir).close()  # what `train` does on start: no temporary file of the killed writer is left
        assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith(".")) == [".lock"]


def test_step_estimators_train_on_a_task_without_verifier_steps(tmp_path, capsys):
    """chain_sum's verifier has no step spans: step_ids come from lines (--step-split auto), so poad/hicra-style
    step estimators run there; --step-split task says why it cannot."""
    args = [*TINY[4:], "--task", "chain_sum", "--steps", "1", "--eval-every", "1", "--critic", "head"]
    assert main(["train", *args, "--estimator", "poad", "--out-dir", str(tmp_path / "auto")]) == 0
    rows = read_metrics(tmp_path / "auto")
    assert math.isfinite(rows[-1]["loss/pg"])
    assert main(["train", *args, "--estimator", "poad", "--step-split", "task", "--out-dir", str(tmp_path / "t")]) == 2
    assert "step_spans" in capsys.readouterr().err
