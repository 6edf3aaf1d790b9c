"""Does this CPU multiply bf16 natively? One SmolLM2-sized matmul in fp32 and under bf16 autocast.

    python benchmarks/bf16_matmul.py                                              # this CPU as it is
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python benchmarks/bf16_matmul.py   # emulate an AVX2-only CPU

Prints the mean time of `F.linear(x [rows, 576], w [1536, 576])` (SmolLM2-135M's MLP up-projection on a batch of
rows) in fp32 and under `torch.autocast("cpu", torch.bfloat16)`, their ratio, and what `creditlab.device` decides
(`native_bf16`, which `--bf16`/`--update-bf16` auto follow). A ratio well above 1 means bf16 is emulated.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from creditlab.device import describe, native_bf16


def mean_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(args.rows, 576, generator=gen), torch.randn(1536, 576, generator=gen)
    fp32 = mean_time(lambda: torch.nn.functional.linear(x, w), args.repeats)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = mean_time(lambda: torch.nn.functional.linear(x, w), args.repeats)
    print(describe("cpu"))
    print(f"fp32 {fp32 * 1e3:.1f} ms, bf16 autocast {bf16 * 1e3:.1f} ms, bf16 / fp32 = {bf16 / fp32:.2f}; "
          f"native_bf16 (auto precision) = {native_bf16('cpu')}")


if __name__ == "__main__":
    main()
