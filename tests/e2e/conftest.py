"""End-to-end tests: real runs, commands in subprocesses, the trained MNIST
classifier. Every test here is slow (`-m "not slow"` leaves them out)."""
import pytest


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_itemcollected(item):
  item.add_marker(pytest.mark.slow)
