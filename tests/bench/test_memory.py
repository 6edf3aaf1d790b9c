"""PeakMemory sees a transient allocation inside its block and not one freed before it."""

import torch

from creditlab.bench.memory import PeakMemory, rss_mb


def test_peak_memory_measures_the_block_alone():
    before = torch.ones(64 * 2**20)  # 256 MiB, freed before the block: must not count as its peak
    del before
    with PeakMemory() as m:
        x = torch.ones(32 * 2**20)  # 128 MiB touched inside the block, then freed
        del x
    assert m.method in ("VmHWM", "sampled VmRSS (2 ms)")
    assert 100 < m.delta_mb < 250, m.record()
    assert m.peak_mb >= m.start_mb and rss_mb() < m.peak_mb
