"""benchmarks/gpu_check.py at toy sizes on the CPU: every registered estimator timed, the step phases recorded."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_gpu_check_smoke_on_cpu(tmp_path):
    from creditlab.registry import list_estimators

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "gpu.json"
    assert module.main(["--device", "cpu", "--policy", "tiny", "--step-sizes", "2x2", "--max-new-tokens", "6",
                        "--estimator-sizes", "16x32", "--repeats", "1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["environment"]["device"] == "cpu" and record["environment"]["cpu"]["model"]
    assert {(r["phase"], r["precision"]) for r in record["step"]} == {
        (phase, prec) for phase in ("sample", "update") for prec in ("fp32", "bf16 autocast")}
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in record["step"])
    assert [r["estimator"] for r in record["estimators"]] == list_estimators()
    assert all(math.isfinite(r["seconds"]) and not r["error"] for r in record["estimators"])  # all run on the CPU
    assert "| grpo | 16×32 |" in out.with_suffix(".md").read_text()
