"""Glue between torch tensors and the native kernels: device guards, streams, NVRTC loading."""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from collections.abc import Iterator

import torch

from . import _native

_nvrtc_loaded = False

# NVRTC: CUDA 13's or CUDA 12's, the major version torch was built with (torch's CUDA wheels
# install it), or the one LONGATTN_NVRTC names. The native side opens the file found here.
NVRTC_ENV = "LONGATTN_NVRTC"
NVRTC_MAJORS = (13, 12)
# where pip puts torch's NVRTC, under a folder of sys.path (site-packages)
NVRTC_WHEEL_FILES = {
    13: ("nvidia/cu13/lib/libnvrtc.so.13*", "nvidia/cuda_nvrtc/lib/libnvrtc.so.13*"),
    12: ("nvidia/cuda_nvrtc/lib/libnvrtc.so.12*",),
}
NVRTC_PACKAGES = {13: "'nvidia-cuda-nvrtc==13.*'", 12: "nvidia-cuda-nvrtc-cu12"}
# CUDA toolkit folders looked at after $CUDA_HOME and $CUDA_PATH
TOOLKIT_HOMES = ("/usr/local/cuda",)


def nvrtc_majors() -> tuple[int, ...]:
    """The NVRTC major versions to look for, in order: the one ``LONGATTN_NVRTC`` names, else
    the CUDA major version of torch's build, else (a CPU build of torch) 13, then 12.

    Raises ValueError when ``LONGATTN_NVRTC`` is set to anything but 12 or 13."""
    env = os.environ.get(NVRTC_ENV, "").strip()
    if env:
        if env not in {str(m) for m in NVRTC_MAJORS}:
            raise ValueError(f"{NVRTC_ENV}={env!r}: expected 12 or 13")
        return (int(env),)
    cuda = torch.version.cuda
    if cuda:
        major = int(cuda.split(".")[0])
        if major in NVRTC_MAJORS:
            return (major,)
    return NVRTC_MAJORS


def nvrtc_candidates(majors: tuple[int, ...]) -> list[str]:
    """NVRTC libraries to try, per major version in order: the files of NVRTC's pip wheels on
    ``sys.path``, ``libnvrtc.so.<major>`` in a CUDA toolkit (``$CUDA_HOME/lib64``,
    ``$CUDA_PATH/lib64``, ``TOOLKIT_HOMES``) or a folder of ``$LD_LIBRARY_PATH``, then the
    soname itself (the loader's search: ldconfig's cache)."""
    found: list[str] = []
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), *TOOLKIT_HOMES]
    toolkit_dirs = [os.path.join(h, "lib64") for h in homes if h]
    toolkit_dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    for major in majors:
        for root in sys.path:
            for pattern in NVRTC_WHEEL_FILES[major]:
                for path in sorted(glob.glob(os.path.join(root or ".", pattern))):
                    if "builtins" not in os.path.basename(path) and os.path.isfile(path):
                        found.append(path)
        for folder in toolkit_dirs:
            path = os.path.join(folder, f"libnvrtc.so.{major}")
            if os.path.isfile(path):
                found.append(path)
        found.append(f"libnvrtc.so.{major}")
    return list(dict.fromkeys(found))


def nvrtc_install_hint(majors: tuple[int, ...]) -> str:
    """What to install when no NVRTC of ``majors`` was found."""
    torch_build = f"torch {torch.__version__} is built with CUDA {torch.version.cuda}; "
    options = " or ".join(f"pip install {NVRTC_PACKAGES[m]} (CUDA {m})" for m in majors)
    return (
        (torch_build if torch.version.cuda else "")
        + options
        + f", or put a CUDA {'/'.join(map(str, majors))} toolkit's lib64 folder on "
        + f"LD_LIBRARY_PATH ({NVRTC_ENV}=12 or 13 picks the major version)"
    )


def _preload_nvrtc() -> None:
    """Opens NVRTC (CUDA 13 or 12: ``nvrtc_majors``) from the first of ``nvrtc_candidates`` that
    loads. Once per process; a failure is kept by the native side, which reports it from
    ``cuda_unavailable_reason`` and from every CUDA call (naming what to install)."""
    global _nvrtc_loaded
    if _nvrtc_loaded:
        return
    _nvrtc_loaded = True
    try:
        majors = nvrtc_majors()
    except ValueError:
        return  # the native side rejects the same LONGATTN_NVRTC value when CUDA is used
    with contextlib.suppress(RuntimeError):
        _native.load_nvrtc(nvrtc_candidates(majors), list(majors), nvrtc_install_hint(majors))


def nvrtc_library() -> tuple[str, int, int]:
    """The NVRTC that compiles the CUDA kernels: (the file or soname it was opened by, major,
    minor). Raises RuntimeError, naming what to install, when none could be opened."""
    _preload_nvrtc()
    return _native.nvrtc_library()


def cuda_unavailable_reason() -> str | None:
    _preload_nvrtc()
    return _native.cuda_unavailable_reason()


# CPU kernels take no stream; one reusable context serves every CPU call.
_NO_STREAM = contextlib.nullcontext(0)


def native_call(t: torch.Tensor) -> contextlib.AbstractContextManager[int]:
    """Device guard for DLPack export plus the stream handle the kernels launch on."""
    return _cuda_call(t) if t.is_cuda else _NO_STREAM


@contextlib.contextmanager
def _cuda_call(t: torch.Tensor) -> Iterator[int]:
    _preload_nvrtc()
    with torch.cuda.device(t.device):
        # torch's current stream of t's device as a raw handle (no Stream object per call)
        yield torch._C._cuda_getCurrentRawStream(t.device.index)


# Dispatch keys that mean something watches op calls: a dispatch mode (FakeTensorMode,
# FlopCounterMode, ...) or a functorch transform.
_WATCHED_KEYS = 0
for _key in ("Python", "PythonTLSSnapshot", "FuncTorchDynamicLayerFrontMode"):
    _WATCHED_KEYS |= torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _key)).raw_repr()
del _key


def direct_call(*tensors: torch.Tensor | None) -> bool:
    """Whether an op may run its implementation directly rather than through torch's dispatcher
    and autograd wrapper (several Python layers per call): plain eager tensors on cpu or cuda,
    no gradient to record, and nothing that watches op calls (torch.compile, dispatch modes,
    functorch transforms, the JIT tracer, the profiler). Results are the same either way."""
    if (
        torch.compiler.is_compiling()
        or torch._C._dispatch_tls_local_include_set().raw_repr() & _WATCHED_KEYS
        or torch._C._autograd._profiler_enabled()
        or torch._C._get_tracing_state() is not None
    ):
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) is not torch.Tensor or not (t.is_cpu or t.is_cuda):
            return False
        if grad and t.requires_grad:
            return False
    return True


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
