"""Shared fixtures of the mm tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Thousands of tiny ops: with several threads on a busy 2-core machine, thread hand-offs cost 100x the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
