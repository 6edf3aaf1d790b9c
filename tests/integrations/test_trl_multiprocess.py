"""CreditGRPOTrainer with two processes (`torchrun --nproc_per_node 2`, gloo on CPU) and uneven completion lengths.

The worker (`trl_mp_worker.py`) forces completions of 2-4 tokens on process 0 and 6-8 on process 1, so the
fields are padded on one process only before they are gathered (the case that crashed with mismatched dtypes).
Each process's advantages are checked against the creditlab estimator run here on the gathered batch that this
test rebuilds from the two processes' outputs. Runs in CI (`make test-trl` passes --runslow).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="trl is not installed (make test-trl builds .venv-trl)")

import torch

from creditlab.batch import RolloutBatch
from creditlab.registry import get_spec

WORKER = Path(__file__).with_name("trl_mp_worker.py")
sys.path.insert(0, str(WORKER.parent))
import trl_mp_worker as worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(WORKER), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in range(2)]
            for name in worker.CONFIGS}


def gathered(parts: list[dict]) -> RolloutBatch:
    """The generation batch rebuilt from the two processes' outputs (right-padded to a common T)."""
    t = max(p["completion_ids"].shape[1] for p in parts)

    def pad(x):
        return torch.nn.functional.pad(x, (0, t - x.shape[1]))

    ids = torch.cat([pad(p["completion_ids"]) for p in parts])
    mask = torch.cat([pad(p["completion_mask"]) for p in parts]).bool()
    texts = worker.tokenizer().batch_decode(ids, skip_special_tokens=True)
    rewards = torch.tensor(worker.reward(texts))
    return RolloutBatch(response_ids=ids, response_mask=mask, group_ids=torch.arange(len(ids)) // worker.G,
                        rewards=rewards)


def extra_fields(name: str, batch: RolloutBatch, parts: list[dict]) -> dict:
    from types import SimpleNamespace

    from creditlab.signals.steps import Segmenter, pad_step_values

    if name == "sum_form":
        ctx = SimpleNamespace(policy=SimpleNamespace(tokenizer=worker.tokenizer()), scores=())
        seg = Segmenter("regex", worker.SPLIT).segment(batch, ctx)
        steps = [seg.step_texts(b) for b in range(batch.B)]
        scores = worker.step_reward(None, None, steps, None)
        return {"step_ids": seg.step_ids, "step_rewards": pad_step_values(scores, seg.num_steps)}
    if name == "stratified":
        return {"strata": torch.cat([p["level"] for p in parts])}  # the dataset column of each row
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(worker.CONFIGS))
def test_two_processes_uneven_lengths_match_creditlab(outputs, name):
    parts = outputs[name]
    assert all(p["world_size"] == 2 for p in parts)
    lengths = [int(p["completion_mask"].sum(1).max()) for p in parts]
    assert lengths[0] < lengths[1], "the processes' completion lengths must differ (padding on one side only)"
    batch = gathered(parts)
    batch = batch.replace(**extra_fields(name, batch, parts))
    kwargs = dict(worker.CONFIGS[name].get("estimator_kwargs", {}))
    expected = get_spec(worker.CONFIGS[name]["estimator"]).fn(batch, **kwargs).advantages  # [B, T]
    b = parts[0]["completion_ids"].shape[0]
    for rank, p in enumerate(parts):
        t = p["completion_ids"].shape[1]
        torch.testing.assert_close(p["advantages"], expected[rank * b:(rank + 1) * b, :t].float())
    assert float(expected.abs().sum()) > 0


@pytest.mark.slow
def test_two_processes_grpo_equals_trl(outputs):
    for p in outputs["grpo"]:
        expected = p["trl_advantages"].unsqueeze(1) * p["completion_mask"]
        torch.testing.assert_close(p["advantages"], expected.float(), atol=1e-5, rtol=1e-5)
