"""Shared pytest configuration for sdkit's tests."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds full-size SD models (still runs in CI; deselect with -m 'not slow')")
