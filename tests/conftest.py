"""Shared pytest configuration for sdkit's tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only fight over the 2 cores (4× slower under load).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds full-size SD models (still runs in CI; deselect with -m 'not slow')")
