"""Glue between torch tensors and the native kernels: device guards, streams, NVRTC loading."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import sys
from collections.abc import Iterator

import torch

from . import _native

_nvrtc_loaded = False


def _preload_nvrtc() -> None:
    """Make libnvrtc.so.13 from torch's pip dependencies visible to the Rust loader.

    cudarc opens NVRTC by soname; a library already loaded by soname is found even when its
    folder is not on the loader path.
    """
    global _nvrtc_loaded
    if _nvrtc_loaded:
        return
    _nvrtc_loaded = True
    for root in sys.path:
        for pattern in ("nvidia/cu13/lib/libnvrtc.so.13*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.13*"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                if "builtins" in path:
                    continue
                with contextlib.suppress(OSError):
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                    return


def cuda_unavailable_reason() -> str | None:
    _preload_nvrtc()
    return _native.cuda_unavailable_reason()


@contextlib.contextmanager
def native_call(t: torch.Tensor) -> Iterator[int]:
    """Device guard for DLPack export plus the stream handle the kernels launch on."""
    if t.device.type == "cuda":
        _preload_nvrtc()
        with torch.cuda.device(t.device):
            yield torch.cuda.current_stream(t.device).cuda_stream
    else:
        yield 0


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """Kernels read any strides but need the last (head-dim) stride to be 1."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_rank(t: torch.Tensor | None, name: str, rank: int, layout: str) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name}: expected rank {rank} {layout}, got shape {tuple(t.shape)}")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None) -> None:
    """An optional packed-batch ``cu_seqlens``: a rank-1 tensor of N + 1 >= 2 entries (its values
    are checked where the op reads them)."""
    check_rank(cu_seqlens, "cu_seqlens", 1, "[N + 1]")
    if cu_seqlens is not None and cu_seqlens.shape[0] < 2:
        raise ValueError(
            f"cu_seqlens: expected [N + 1] entries with N >= 1, got {cu_seqlens.shape[0]}"
        )


def wants_out_lo(*inputs: torch.Tensor | None) -> bool:
    """Whether a softmax forward should also store its output's rounding residual ``out_lo``: a
    16-bit output whose backward will run (grad mode on, some input requires grad). The
    backward's Δ = rowsum(dO ∘ (out + out_lo)) then carries the float32 output, where the 16-bit
    rounding of out alone cancels badly for nearly one-hot attention."""
    return (
        inputs[0].dtype in (torch.float16, torch.bfloat16)
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in inputs)
    )
