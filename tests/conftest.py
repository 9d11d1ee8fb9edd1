"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from more threads, and on a busy shared CPU extra threads spin-wait
    (measured: 2 threads 0.6 steps/s against 13 steps/s with 1 thread at load 15 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
