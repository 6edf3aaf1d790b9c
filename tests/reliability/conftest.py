"""Shared pieces of the reliability suite: tiny run arguments and one finished 1-step run to copy from."""

import json
import shutil

import pytest
import torch

from creditlab.cli import main

# The smallest run that exercises every part of the trainer: tiny policy, 2 prompts x 4 samples, short responses.
TINY = ["--task", "arith_chain", "--task-kwargs", '{"n_steps": 2}', "--policy", "tiny", "--prompts-per-step", "2",
        "--group-size", "4", "--max-new-tokens", "16", "--eval-problems", "2", "--eval-every", "100",
        "--no-tensorboard", "--no-progress", "--sample-every", "0", "--lr", "1e-3"]


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """One intra-op thread: bitwise resume comparisons need it (with two, CPU kernels are not bit-reproducible
    between runs in one process: we measured a 7e-8 relative grad_norm difference between two identical straight
    runs, platform noise rather than lost checkpoint state), and these tiny models run faster on one. Package scope:
    restored when this suite is done, and set before the package-scoped `finished_run` is made."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="package")
def finished_run(tmp_path_factory, one_thread):
    """A 1-step grpo run (checkpoint ckpt-000001); copy it with `copy_run` before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", *TINY, "--estimator", "grpo", "--steps", "1", "--out-dir", str(out)]) == 0
    return out


@pytest.fixture
def copy_run(finished_run, tmp_path):
    def copy(name="run"):
        target = tmp_path / name
        shutil.copytree(finished_run, target)
        (target / ".lock").unlink(missing_ok=True)
        return target

    return copy
