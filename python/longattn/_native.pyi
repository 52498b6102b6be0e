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
def load_nvrtc(candidates: list[str], majors: list[int], hint: str) -> tuple[str, int, int]: ...
def nvrtc_library() -> tuple[str, int, int]: ...
def nvrtc_compile(name: str, src: str, arch: str) -> tuple[bytes, str]: ...
def sm90_launch_count() -> int: ...
def sm90_machine_code(dir: str) -> list[tuple[str, str, str]]: ...

RAT_MAX_HEAD_DIM: int

def rat_fwd(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    out: Any,
    lse: Any,
    k_states: Any,
    v_states: Any,
    chunk_size: int,
    scale: float,
    rope_theta: float | None,
    cu_seqlens: Any | None,
    stream: int,
    scratch: tuple[Any, ...] | None = None,
) -> None: ...
def rat_decode(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    out: Any,
    k_run: Any,
    v_run: Any,
    k_states: Any,
    v_states: Any,
    partial: Any | None,
    seen: int,
    chunk_size: int,
    scale: float,
    rope_theta: float | None,
    stream: int,
) -> None: ...
def rat_bwd(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    out: Any,
    lse: Any,
    k_states: Any,
    v_states: Any,
    grad_out: Any,
    dq: Any,
    dk: Any,
    dv: Any,
    dg: Any,
    chunk_size: int,
    scale: float,
    rope_theta: float | None,
    cu_seqlens: Any | None,
    stream: int,
    scratch: tuple[Any, ...] | None = None,
) -> None: ...

NSA_MAX_HEAD_DIM: int

def nsa_branch_fwd(
    kind: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    block_indices: Any,
    block_counts: Any,
    count: Any,
    a: Any,
    b: Any,
    scale: Any,
    cu_seqlens: Any,
    stream: Any,
) -> Any: ...
def nsa_branch_bwd(
    kind: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    dq: Any,
    dk: Any,
    dv: Any,
    block_indices: Any,
    block_counts: Any,
    count: Any,
    a: Any,
    b: Any,
    scale: Any,
    cu_seqlens: Any,
    stream: Any,
) -> Any: ...
def nsa_topk_blocks(
    q: Any,
    k_cmp: Any,
    lse: Any,
    block_indices: Any,
    kernel_size: Any,
    kernel_stride: Any,
    block_size: Any,
    topk: Any,
    init_blocks: Any,
    local_blocks: Any,
    scale: Any,
    cu_seqlens: Any,
    stream: Any,
) -> Any: ...
def nsa_compress_fwd(
    x: Any,
    weight: Any,
    pe: Any,
    out: Any,
    kernel_size: Any,
    kernel_stride: Any,
    cu_seqlens: Any,
    cu_seqlens_cmp: Any,
    stream: Any,
) -> Any: ...
def nsa_compress_bwd(
    x: Any,
    weight: Any,
    pe: Any,
    grad_out: Any,
    dx: Any,
    dweight: Any,
    dpe: Any,
    kernel_size: Any,
    kernel_stride: Any,
    cu_seqlens: Any,
    cu_seqlens_cmp: Any,
    scratch: Any,
    stream: Any,
) -> Any: ...

LANDMARK_MAX_HEAD_DIM: int

def landmark_fwd(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    block_indices: Any,
    block_size: Any,
    scale: Any,
    cu_seqlens: Any,
    stream: Any,
) -> Any: ...
def landmark_bwd(
    q: Any,
    k: Any,
    v: Any,
    grad_out: Any,
    lse: Any,
    delta: Any,
    dq: Any,
    dk: Any,
    dv: Any,
    block_indices: Any,
    block_size: Any,
    scale: Any,
    cu_seqlens: Any,
    stream: Any,
) -> Any: ...
def landmark_topk(
    q: Any,
    k: Any,
    out: Any,
    block_size: Any,
    scale: Any,
    cu_seqlens: Any,
    stream: Any,
) -> Any: ...
