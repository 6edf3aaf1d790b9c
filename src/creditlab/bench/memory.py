"""Peak memory of a block of code: resident set size (CPU) and, on CUDA, the allocator's peak.

    with PeakMemory() as m:
        step()
    m.peak_mb, m.start_mb, m.delta_mb      # peak RSS during the block, RSS before it, peak - before

On Linux the kernel's high-water mark (VmHWM) is reset at entry by writing "5" to /proc/self/clear_refs, so the
peak belongs to the block alone; where that is refused, a thread samples VmRSS every 2 ms (which can miss a peak
shorter than that). `method` says which was used. Before the reset, glibc's `malloc_trim(0)` hands freed heap
pages back to the kernel, so memory an earlier block freed but the allocator kept (seen: 2 GiB after a full-logits
update) does not count as this block's. RSS still counts everything the process holds (weights, optimizer state),
so compare blocks measured the same way in one process, or their `delta_mb`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import threading
import time
from typing import Any

import torch


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), flags=re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def trim_heap() -> None:
    """Collect garbage and return freed heap pages to the kernel (glibc `malloc_trim`; a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_mb() -> float:
    """Current resident set size in MiB (NaN where /proc is unavailable)."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


class PeakMemory:
    """Context manager measuring the peak RSS (and CUDA peak allocation on `device`) of its block, in MiB."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.start_mb = self.peak_mb = float("nan")
        self.cuda_peak_mb: float | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0.0

    def __enter__(self) -> PeakMemory:
        trim_heap()
        self.start_mb = rss_mb()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.method = "VmHWM"
        except OSError:
            self.method = "sampled VmRSS (2 ms)"
            self._sampled = self.start_mb
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, rss_mb())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._sampled, rss_mb())
        else:
            kb = _status_kb("VmHWM")
            self.peak_mb = kb / 1024 if kb is not None else float("nan")

    @property
    def delta_mb(self) -> float:
        """Peak during the block minus RSS at its start."""
        return self.peak_mb - self.start_mb

    def record(self) -> dict[str, Any]:
        out = {"peak_mb": self.peak_mb, "start_mb": self.start_mb, "delta_mb": self.delta_mb, "method": self.method}
        if self.cuda_peak_mb is not None:
            out["cuda_peak_mb"] = self.cuda_peak_mb
        return out


def timed_peak(fn: Any, device: torch.device | str = "cpu") -> tuple[Any, float, dict[str, Any]]:
    """(fn(), seconds, PeakMemory record) of one call."""
    with PeakMemory(device) as m:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, m.record()
