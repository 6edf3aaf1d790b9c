"""Rollout tests run the tiny policy single-threaded.

Its matmuls are so small that intra-op threading costs more than it gains: on the shared 2-core machines one
thread was 2-3x faster for these tests (and >100x faster per op when the cores were oversubscribed).
"""

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
