"""Type stubs for the Rust extension. Internal: use the functions of ``longattn``."""

from typing import Any

DOT_SLOTS: int
MAX_HEAD_DIM: int

def lightning_fwd(
    q: Any,
    k: Any,
    v: Any,
    slopes: Any,
    out: Any,
    initial_state: Any | None,
    final_state: Any,
    scale: float,
    cu_seqlens: Any | None,
    stream: int,
) -> None: ...
def lightning_bwd(
    q: Any,
    k: Any,
    v: Any,
    slopes: Any,
    grad_out: Any,
    initial_state: Any | None,
    grad_final_state: Any | None,
    dq: Any,
    dk: Any,
    dv: Any,
    grad_initial_state: Any,
    partial_q: Any,
    partial_k: Any,
    scale: float,
    cu_seqlens: Any | None,
    stream: int,
) -> None: ...
def compile_all_kernels(arch: str) -> list[tuple[str, int]]: ...
def cuda_unavailable_reason() -> str | None: ...
