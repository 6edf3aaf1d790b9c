"""--device and the auto precision: resolution rules, CLI tri-state, CPU flags, the trainer's device record."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

import creditlab.device as dev
from creditlab.train.config import add_train_args, train_config_from_args


def test_resolve_device_rules():
    assert dev.resolve_device("cpu") == torch.device("cpu")
    assert dev.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device must be"):
        dev.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: torch sees no CUDA device"):
            dev.resolve_device("cuda")


def test_auto_bf16_needs_native_units_and_a_large_model(monkeypatch):
    monkeypatch.setattr(dev, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not dev.native_bf16("cpu")
    assert dev.resolve_bf16(None, "cpu", 10**9) is False  # AVX2/AVX-512 without bf16 units: emulated, slow
    assert dev.resolve_bf16(True, "cpu", 10) is True  # an explicit choice wins
    monkeypatch.setattr(dev, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert dev.native_bf16("cpu")
    assert dev.resolve_bf16(None, "cpu", 135_000_000) is True
    assert dev.resolve_bf16(None, "cpu", 400_000) is False  # the tiny policy stays fp32 everywhere
    assert dev.resolve_bf16(False, "cpu", 135_000_000) is False


def test_a_onednn_isa_cap_below_bf16_means_no_native_bf16(monkeypatch):
    monkeypatch.setattr(dev, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    for cap, native in [("AVX2", False), ("avx512_core", False), ("AVX512_CORE_VNNI", False), ("AVX2_VNNI_2", False),
                        ("AVX512_CORE_BF16", True), ("AVX512_CORE_AMX", True), ("ALL", True), (" ", True)]:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
        assert dev.native_bf16("cpu") is native, cap
        assert dev.resolve_bf16(None, "cpu", 135_000_000) is native, cap
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")  # oneDNN's older name for the same cap
    assert dev.onednn_isa_cap() == "AVX2" and not dev.native_bf16("cpu")
    monkeypatch.setattr(dev, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "ALL")  # a cap never adds units the CPU lacks
    assert not dev.native_bf16("cpu")


def test_cpu_info_names_the_model_and_bf16_flags():
    info = dev.cpu_info()
    assert info["model"] and info["cores"] >= 1
    assert set(info["flags"]) <= set(dev.REPORTED_FLAGS)
    assert info["native_bf16"] == dev.native_bf16("cpu")
    assert "onednn_max_isa" in info
    assert dev.describe("cpu").startswith("cpu: ")


def _parse(argv: list[str]):
    p = argparse.ArgumentParser()
    add_train_args(p)
    return train_config_from_args(p.parse_args(argv))


def test_bf16_flags_are_tri_state_on_the_command_line():
    assert _parse([]).rollout.bf16 is None and _parse([]).optim.update_bf16 is None
    cfg = _parse(["--bf16", "--no-update-bf16", "--device", "cpu"])
    assert cfg.rollout.bf16 is True and cfg.optim.update_bf16 is False and cfg.run.device == "cpu"


def test_trainer_records_device_and_decided_precision(tmp_path):
    from creditlab.train.config import EvalConfig, LogConfig, RolloutConfig, RunConfig, TrainConfig
    from creditlab.train.loop import train

    cfg = TrainConfig(run=RunConfig(steps=1, out_dir=str(tmp_path / "run"), device="cpu"),
                      rollout=RolloutConfig(prompts_per_step=2, group_size=2, max_new_tokens=6),
                      eval=EvalConfig(eval_problems=2), log=LogConfig(tensorboard=False, progress=False))
    train(cfg)
    record = json.loads((tmp_path / "run" / "device.json").read_text())
    assert record["device"] == "cpu" and record["rollout_bf16"] is False and record["update_bf16"] is False
    assert record["cpu"]["model"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["rollout"]["bf16"] is None  # config.json keeps "auto" so a resumed run compares equal
