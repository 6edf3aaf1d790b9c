"""Smoke test of benchmarks/vs_trl.py: the --tiny mode for two steps, in the TRL environment (`.venv-trl`).

Skips cleanly where trl (or reasoning-gym, which the benchmark's chain_sum task needs) is not installed.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="trl is not installed (make test-trl builds .venv-trl)")
pytest.importorskip("reasoning_gym", reason="reasoning-gym is not installed (the chain_sum task needs it)")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vs_trl.py"


def test_tiny_two_steps_write_a_complete_report(tmp_path):
    out = tmp_path / "vs_trl.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--eval-every", "1", "--warmup", "0",
                           "--threads", "1",
                           "--precision", "fp32", "--device", "cpu", "--profile", "--profile-top", "5",
                           "--out", str(out), "--work-dir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["prompt_format"]["match"]  # TRL and creditlab feed the model the same prompt tokens
    for name in ("creditlab", "trl"):
        r = report[name]
        assert r["steps"] == 2 and r["samples"] == 8  # tiny: 2 prompts x 2 samples per step
        assert len(r["step_s"]) == 2 and len(r["rollout_s"]) == 2
        assert math.isfinite(r["samples_per_s"]) and r["samples_per_s"] > 0
        assert 0.0 <= r["final_accuracy"] <= 1.0
        assert len(r["peak_mb"]) == 2 and min(r["peak_mb"]) > 0  # each step's peak memory, measured the same way
        # --eval-every 1: both learning curves at steps 0, 1, 2 (JSON keys are strings), ending at the final accuracy
        assert sorted(r["accuracy_at"], key=int) == ["0", "1", "2"], r["accuracy_at"]
        assert r["accuracy_at"]["2"] == r["final_accuracy"]
        assert r["accuracy_at"]["0"] == report["creditlab"]["initial_accuracy"]
    assert list(report["pairs"]) == ["fp32"] and report["pairs"]["fp32"]["precision"]["trl_bf16"] is False
    assert report["meta"]["environment"]["cpu"]["model"]  # the record names the CPU
    assert report["creditlab"]["initial_accuracy"] is not None
    assert math.isfinite(report["ratio_samples_per_s"]) and report["ratio_samples_per_s"] > 0
    assert "rl_step" in report["profile"]  # the profiled call is creditlab's step
    md = out.with_suffix(".md").read_text()
    assert "| creditlab |" in md and "| held-out accuracy at step | 0 | 1 | 2 |" in md
    assert "samples/s" in proc.stdout
