"""What the compute-sanitizer workloads (benchmarks/sanitize_<family>.py) share: the device they
run on, the relative error against a float64 reference, and a case runner that prints one
``case <name>: ok|FAIL <error>=<value> ...`` line per case (scripts/device.sh summarises those
lines) and turns the failures into the exit status.

Importing it asks for one cudaMalloc per tensor (torch reads the setting at its first CUDA
allocation), so memcheck sees the true bounds of every tensor.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

import torch

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")


def workload_device() -> torch.device:
    """CUDA, or the CPU with ``--cpu`` (a check of the script itself, no sanitizer)."""
    return torch.device("cpu" if "--cpu" in sys.argv else "cuda")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against b (absolute where b is zero; nan when a has a
    non-finite element)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


class Cases:
    """Runs named cases and remembers which failed. A case returns {error name: value}; each value
    must be at most its tolerance: ``tol``, or ``per_error[name]`` where given."""

    def __init__(self, device: torch.device):
        self.device = device
        self.failures: list[str] = []

    def check(
        self, name: str, run: Callable[[], dict[str, float]], tol: float, **per_error: float
    ) -> None:
        try:
            errs = run()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            bad = [k for k, e in errs.items() if not e <= per_error.get(k, tol)]
            shown = " ".join(f"{k}={e:.2e}" for k, e in errs.items())
            print(f"case {name}: {'FAIL' if bad else 'ok'} {shown}", flush=True)
            if bad:
                self.failures.append(name)
        except Exception:  # noqa: BLE001 - a case that raises is a failed case; the rest go on
            traceback.print_exc()
            print(f"case {name}: FAIL raised", flush=True)
            self.failures.append(name)

    def exit_status(self) -> int:
        print(f"{len(self.failures)} failure(s)" + (f": {self.failures}" if self.failures else ""))
        return 1 if self.failures else 0
