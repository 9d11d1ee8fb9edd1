"""Fixtures shared by several test modules."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from more threads, and on a busy shared CPU extra threads spin-wait
    (on a loaded 2-core machine two threads ran a tiny model about 20x slower than one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
