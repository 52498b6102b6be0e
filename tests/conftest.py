"""pytest fixtures and hooks: the ``device`` fixture, seeding, the ``cuda`` marker. The shared
helpers (devices, dtypes, tolerances, checks against the references) live in tests/harness.py."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICES, HAS_CUDA, NEEDS_CUDA


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same RNG state (reproducible failures)."""
    torch.manual_seed(0)
    if HAS_CUDA:
        torch.cuda.manual_seed_all(0)
    return 0


def _needs_cuda(item: pytest.Item) -> bool:
    """A test that runs on CUDA: a ``device`` parameter (fixture or parametrize) of "cuda", or
    a skip for want of a CUDA device."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and str(callspec.params.get("device", "")).startswith("cuda"):
        return True
    return any(m.kwargs.get("reason") == NEEDS_CUDA for m in item.iter_markers("skipif"))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    # before `-m` selects: every CUDA test carries the cuda marker, however it was written
    for item in items:
        if item.get_closest_marker("cuda") is None and _needs_cuda(item):
            item.add_marker(pytest.mark.cuda)
