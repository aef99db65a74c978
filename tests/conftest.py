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


@pytest.fixture(scope="module")
def live_tiny_test():
    """tiny-test with random weights whose zero-initialised layers (the UNet's output conv, the transformers'
    proj_out) get small random weights too, so that ε depends on the latent and the prompt. Only plumbing can be
    tested on it: it is not a denoiser."""
    import sdkit

    torch.manual_seed(0)
    model = sdkit.load_model("tiny-test")
    with torch.no_grad():
        for p in model.model.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return model
