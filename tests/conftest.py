"""Shared pytest helpers: devices, seeding, relative error, NaN poison."""

from __future__ import annotations

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# "cpu" always, "cuda" only where a GPU is present (the only tests skipped by default).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")],
    ),
]
# a Hopper GPU: eligible 16-bit calls run the sm_90a attention engine unless forced onto sm_80
HAS_HOPPER = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)


def engine_path(monkeypatch, force_sm80: bool):
    """Selects the CUDA path (LONGATTN_FORCE_SM80, else the engine: LONGATTN_SM90=1, and
    LONGATTN_LANDMARK_SM90 opts landmark in) and returns a check that the Hopper engine ran (or,
    forced or on another GPU, did not) for the calls made since."""
    from longattn import _native

    monkeypatch.setenv("LONGATTN_FORCE_SM80", "1" if force_sm80 else "0")
    monkeypatch.setenv("LONGATTN_SM90", "1")
    monkeypatch.setenv("LONGATTN_LANDMARK_SM90", "1")
    before = _native.sm90_launch_count()

    def check(expect_engine: bool = True):
        ran = _native.sm90_launch_count() > before
        assert ran == (expect_engine and HAS_HOPPER and not force_sm80)

    return check


# the same, as plain strings, for loops inside a test
AVAILABLE_DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b is all zeros). NaN/Inf give nan/inf."""
    a64 = a.detach().to(device="cpu", dtype=torch.float64)
    b64 = b.detach().to(device="cpu", dtype=torch.float64)
    assert a64.shape == b64.shape, f"shape mismatch: {tuple(a64.shape)} vs {tuple(b64.shape)}"
    num = torch.linalg.vector_norm(a64 - b64).item()
    den = torch.linalg.vector_norm(b64).item()
    return num / den if den > 0 else num


def assert_finite(t: torch.Tensor, name: str = "tensor") -> None:
    bad = ~torch.isfinite(t)
    assert not bad.any(), f"{name} has {int(bad.sum())} non-finite values (of {t.numel()})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN in place (an unwritten element then fails a check)."""
    return t.fill_(float("nan"))


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))
