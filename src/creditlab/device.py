"""Where a run computes and in which precision: `--device` and the `auto` default of `--bf16` / `--update-bf16`.

    device = resolve_device("auto")              # cuda when torch sees a GPU, else cpu
    use_bf16 = resolve_bf16(None, device, n_params=135_000_000)   # None = auto

bf16 autocast pays only where the hardware multiplies bf16 natively: on an AVX2-only CPU, PyTorch emulates it and a
SmolLM2 update under autocast ran >= 7x slower than fp32 (issue 18), while CPUs with AVX512-BF16 or AMX-BF16 units
(and every recent GPU) run it faster. A oneDNN cap below the bf16 level (`ONEDNN_MAX_CPU_ISA=AVX2`, with
`ATEN_CPU_CAPABILITY=avx2` for ATen's own kernels) reproduces an AVX2-only CPU on a newer one and counts as no native
bf16. `auto` therefore turns bf16 on when the device has native bf16 *and* the
policy is large enough for its matmuls to dominate (>= `BF16_MIN_PARAMS`); the 0.4 M-parameter `tiny` policy stays
fp32 everywhere, so its tests, demo and benchmark numbers do not depend on whether the CPU has bf16 units (they
still depend on the kernels' vector width: `make demo` prints other numbers on an AVX2-only CPU than on an
AVX-512 one).

`cpu_info()` is what benchmark records store (model name, the bf16-relevant flags, core count) so that a number
says on which CPU it was measured.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from typing import Any

import torch

BF16_MIN_PARAMS = 50_000_000  # `auto` keeps smaller policies in fp32 (their matmuls are too small to gain)
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 multiply units
REPORTED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_vnni", "avx_vnni")


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; "cpu", "cuda", "cuda:N" as given (cuda must be available)."""
    if name in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: torch sees no CUDA device (this torch is {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where that file does not exist)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def onednn_isa_cap() -> str | None:
    """The instruction-set cap the user put on oneDNN (`ONEDNN_MAX_CPU_ISA`, or its old name `DNNL_MAX_CPU_ISA`),
    upper-cased; None when unset."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap and cap.strip() else None


def _isa_cap_allows_bf16(cap: str | None) -> bool:
    """Whether a oneDNN ISA cap leaves the bf16 units usable: unset, ALL/DEFAULT, or a level with bf16 dot products
    (AVX512_CORE_BF16 and above: the FP16, AMX and AVX10 levels). SSE41 … AVX2_VNNI_2, AVX512_CORE(_VNNI) do not."""
    if cap is None or cap in ("ALL", "DEFAULT"):
        return True
    return any(part in cap for part in ("BF16", "FP16", "AMX", "AVX10"))


def native_bf16(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA device with bf16 support, or a CPU with AVX512-BF16 or
    AMX-BF16 (read from /proc/cpuinfo; False where the flags cannot be read) whose oneDNN is not capped below its
    bf16 level (`ONEDNN_MAX_CPU_ISA=AVX2` makes PyTorch's CPU bf16 matmuls run emulated, ~4x slower than fp32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS) and _isa_cap_allows_bf16(onednn_isa_cap())


def resolve_bf16(setting: bool | None, device: torch.device | str, n_params: int) -> bool:
    """An explicit True/False wins; None (auto) = native bf16 on `device` and n_params >= BF16_MIN_PARAMS."""
    if setting is not None:
        return bool(setting)
    return native_bf16(device) and n_params >= BF16_MIN_PARAMS


@functools.cache
def cpu_info() -> dict[str, Any]:
    """CPU model (`lscpu` "Model name"), cores, the bf16-relevant flags present, and torch's kernel level."""
    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")
    except (OSError, subprocess.SubprocessError):
        pass
    flags = cpu_flags()
    return {"model": model or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "flags": [f for f in REPORTED_FLAGS if f in flags], "native_bf16": native_bf16("cpu"),
            "torch_capability": torch.backends.cpu.get_cpu_capability(), "onednn_max_isa": onednn_isa_cap()}


def device_info(device: torch.device | str) -> dict[str, Any]:
    """The record a benchmark stores about where it ran: device, CPU info, GPU name when on CUDA, torch threads."""
    device = torch.device(device)
    info: dict[str, Any] = {"device": str(device), "cpu": cpu_info(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def describe(device: torch.device | str) -> str:
    """One line for a report: 'cpu: AMD EPYC (2 cores; avx2, avx512f, avx512_bf16), 2 threads' or the GPU name."""
    info = device_info(device)
    cpu = info["cpu"]
    where = f"{cpu['model']} ({cpu['cores']} cores; {', '.join(cpu['flags']) or 'no AVX flags read'}"
    if cpu.get("onednn_max_isa"):  # an emulated smaller CPU: say so wherever the record is shown
        where += f"; oneDNN capped at {cpu['onednn_max_isa']}, ATen kernels {cpu['torch_capability']}"
    where += ")"
    if "gpu" in info:
        return f"{info['device']}: {info['gpu']} (host CPU {where})"
    return f"cpu: {where}, {info['threads']} torch threads"
