"""rat_attn: RAT chunked attention (gated recurrence inside chunks, softmax across chunks).

Math and conventions: ``docs/api/rat.md``. The forward writes y, the lse and every chunk's final
state; the backward recomputes the partial states from those (nothing O(T^2), nothing O(T·D)
saved beyond the output and, for 16-bit outputs a backward will need, its rounding residual y_lo,
one more output-sized tensor: the backward's Δ = dy·(y + y_lo) stays accurate for nearly one-hot
rows). CPU tensors run the Rust CPU kernels, CUDA tensors the fused kernels of ``cuda/rat.cu``
(float32/float16/bfloat16; head dim <= 256, <= 128 for float32); the CUDA path allocates its
scratch buffers here with torch (O(B·T/L·H·D), plus Δ [B, T, H] in the backward).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .. import _native
from .._deprecation import DEPRECATED, renamed
from .._runtime import (
    check_cu_seqlens,
    check_rank,
    direct_call,
    native_call,
    state_dtype,
    unit_last_stride,
    wants_out_lo,
)

__all__ = [
    "rat_attn",
    "rat_attn_with_states",
    "rat_fwd",
    "rat_bwd",
    "rat_decode",
    "rat_decode_splits",
    "rat_state_chunks",
]


def rat_state_chunks(T: int, chunk_size: int, num_seqs: int | None) -> int:
    """Chunk slots C of the ``[B, C, H, D]`` chunk-final state tensors of :func:`rat_fwd`:
    ``ceil(T / L)``, or ``(T + N (L - 1)) // L`` for N packed sequences, where sequence n's
    chunks start at slot ``(cu_seqlens[n] + n (L - 1)) // L``."""
    if num_seqs is None:
        return -(-T // chunk_size)
    return (T + num_seqs * (chunk_size - 1)) // chunk_size


def _state_shape(q: Tensor, chunk_size: int, cu_seqlens: Tensor | None) -> tuple[int, ...]:
    n = None if cu_seqlens is None else cu_seqlens.shape[0] - 1
    B, T, H, D = q.shape
    return (B, rat_state_chunks(T, chunk_size, n), H, D)


def _cuda_scratch(q: Tensor, shape: tuple[int, ...], chunk_size: int, backward: bool):
    """Scratch of the CUDA kernels: rotated chunk-final keys and values in q's dtype, the scan
    states entering every 64-token sub-tile (L > 64 only), and in the backward Δ and the
    chunk-state gradients (float32)."""
    if q.device.type != "cuda":
        return None
    B, C, H, D = shape
    kr = torch.empty(shape, dtype=q.dtype, device=q.device)
    ve = torch.empty(shape, dtype=q.dtype, device=q.device)
    slots = C * -(-chunk_size // 64) if chunk_size > 64 else 1
    f32 = {"dtype": torch.float32, "device": q.device}
    carry_k = torch.empty(B, slots, H, D, **f32)
    carry_v = torch.empty(B, slots, H, D, **f32)
    if not backward:
        return (kr, ve, carry_k, carry_v)
    delta = torch.empty(q.shape[:3], **f32)
    dks = torch.empty(shape, **f32)
    dvs = torch.empty(shape, **f32)
    return (kr, ve, carry_k, carry_v, delta, dks, dvs)


def _rat_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    chunk_size: int,
    scale: float,
    rope_theta: float | None,
    cu_seqlens: Tensor | None,
    with_out_lo: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(y, lse, k_states, v_states, y_lo)``: lse ``[B, T, H]``, the un-rotated
    chunk-final states ``[B, C, H, D]`` (:func:`rat_state_chunks`) in float32 (float64), and with
    ``with_out_lo`` y's rounding residual (like y; else 0 elements) for the backward's Δ."""
    sdt = state_dtype(q.dtype)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out_lo = torch.empty(_out_lo_shape(q, with_out_lo), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=sdt, device=q.device)
    shape = _state_shape(q, chunk_size, cu_seqlens)
    k_states = torch.zeros(shape, dtype=sdt, device=q.device)
    v_states = torch.zeros(shape, dtype=sdt, device=q.device)
    scratch = _cuda_scratch(q, shape, chunk_size, backward=False)
    with native_call(q) as stream:
        _native.rat_fwd(
            q.detach(),
            k.detach(),
            v.detach(),
            g.detach(),
            out,
            out_lo if with_out_lo else None,
            lse,
            k_states,
            v_states,
            chunk_size,
            scale,
            rope_theta,
            cu_seqlens,
            stream,
            scratch,
        )
    return out, lse, k_states, v_states, out_lo


# eager calls that need no dispatcher run _rat_fwd directly (direct_call)
rat_fwd = torch.library.custom_op(
    "longattn::rat_fwd", _rat_fwd, mutates_args=(), device_types=("cpu", "cuda")
)


@rat_fwd.register_fake
def _(q, k, v, g, chunk_size, scale, rope_theta, cu_seqlens, with_out_lo=False):
    sdt = state_dtype(q.dtype)
    shape = _state_shape(q, chunk_size, cu_seqlens)
    return (
        q.new_empty(q.shape),
        q.new_empty(q.shape[:3], dtype=sdt),
        q.new_empty(shape, dtype=sdt),
        q.new_empty(shape, dtype=sdt),
        q.new_empty(_out_lo_shape(q, with_out_lo)),
    )


def _out_lo_shape(q: Tensor, with_out_lo: bool) -> tuple[int, ...]:
    """y's rounding residual (16-bit outputs that a backward will need), else 0 elements (a
    custom op cannot return None)."""
    return tuple(q.shape) if with_out_lo else (0,)


@torch.library.custom_op("longattn::rat_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def rat_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    out: Tensor,
    out_lo: Tensor,
    lse: Tensor,
    k_states: Tensor,
    v_states: Tensor,
    grad_out: Tensor,
    chunk_size: int,
    scale: float,
    rope_theta: float | None,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    dg = torch.empty(g.shape, dtype=g.dtype, device=q.device)
    grad_out = unit_last_stride(grad_out)
    scratch = _cuda_scratch(q, tuple(k_states.shape), chunk_size, backward=True)
    with native_call(q) as stream:
        _native.rat_bwd(
            q.detach(),
            k.detach(),
            v.detach(),
            g.detach(),
            out.detach(),
            out_lo.detach() if out_lo.numel() else None,
            lse.detach(),
            k_states.detach(),
            v_states.detach(),
            grad_out.detach(),
            dq,
            dk,
            dv,
            dg,
            chunk_size,
            scale,
            rope_theta,
            cu_seqlens,
            stream,
            scratch,
        )
    return dq, dk, dv, dg


@rat_bwd.register_fake
def _(
    q, k, v, g, out, out_lo, lse, k_states, v_states, grad_out, chunk_size, scale, rope_theta, cu
):
    return (
        torch.empty_like(q),
        q.new_empty(k.shape),
        q.new_empty(v.shape),
        torch.empty_like(g),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, g, chunk_size, scale, rope_theta, cu_seqlens, *_ = inputs
    out, lse, k_states, v_states, out_lo = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(lse, k_states, v_states, out_lo)
    ctx.chunk_size, ctx.scale, ctx.rope_theta = chunk_size, scale, rope_theta
    ctx.save_for_backward(q, k, v, g, out, out_lo, lse, k_states, v_states, cu_seqlens)


def _backward(ctx, grad_out, _grad_lse, _grad_ks, _grad_vs, _grad_out_lo):
    q, k, v, g, out, out_lo, lse, k_states, v_states, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        return None, None, None, None, None, None, None, None, None
    dq, dk, dv, dg = rat_bwd(
        q,
        k,
        v,
        g,
        out,
        out_lo,
        lse,
        k_states,
        v_states,
        grad_out,
        ctx.chunk_size,
        ctx.scale,
        ctx.rope_theta,
        cu_seqlens,
    )
    return dq, dk, dv, dg, None, None, None, None, None


rat_fwd.register_autograd(_backward, setup_context=_setup_context)


def _prepare(q, k, v, g, chunk_size, scale, rope_theta, cu_seqlens):
    for t, name in ((q, "q"), (k, "k"), (v, "v"), (g, "g")):
        check_rank(t, name, 4, "[B, T, H, D]")
    check_cu_seqlens(cu_seqlens)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size: expected an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be at least 1, got {chunk_size}")
    if rope_theta is not None:
        rope_theta = float(rope_theta)
        if not rope_theta > 0:
            raise ValueError(f"rope_theta: must be a positive number or None, got {rope_theta}")
        if q.shape[-1] % 2:
            # checked here as well as in the kernels, so that the message uses the Python name
            raise ValueError(
                f"q: RoPE (rope_theta set) needs an even head dim, got {q.shape[-1]}; "
                "pass rope_theta=None"
            )
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v, g = (unit_last_stride(t) for t in (q, k, v, g))
    return q, k, v, g, chunk_size, scale, rope_theta


def rat_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    chunk_size: int = 16,
    scale: float | None = None,
    rope_theta: float | None = 10000.0,
    cu_seqlens: Tensor | None = None,
    return_lse: bool = False,
    rope_base: float | None = DEPRECATED,
) -> Tensor | tuple[Tensor, Tensor]:
    """RAT chunked attention (math and API: docs/api/rat.md).

    Inside every chunk of ``chunk_size`` tokens the keys and values run the gated recurrence
    ``k~_t = g_t * k~_{t-1} + (1 - g_t) * k_t`` (same for v; reset at each chunk start); query t
    then attends, with one softmax, to the final states of all earlier chunks of its sequence
    and to its own partial state. q and the states are rotated by the chunk RoPE
    (``rope_theta=None`` disables it).

    Args:
        q, k, v: ``[B, T, H, D]``, same dtype (float64 on CPU, float32, float16, bfloat16);
            any strides with a unit last stride (stride-0 expanded heads need no copy).
        g: ``[B, T, H, D]`` forget gate in (0, 1), float32 or the input dtype.
        chunk_size: L >= 1; T need not be a multiple of it.
        scale: score scale, default ``D ** -0.5``.
        rope_theta: chunk-RoPE base (rotate_half over all D dims, D even), or None.
        cu_seqlens: int32/int64 ``[N + 1]`` cumulative sequence starts of a packed batch (B = 1);
            chunks restart at every sequence start.
        return_lse: also return the log-sum-exp of every query's softmax.
        rope_base: deprecated alias of ``rope_theta`` (one release, DeprecationWarning).

    Returns:
        y ``[B, T, H, D]`` in q's dtype, or ``(y, lse)`` with ``return_lse=True``: lse
        ``[B, T, H]`` float32 (float64 for float64), no gradient. Gradients flow to q, k, v, g.
    """
    rope_theta = renamed("rat_attn", "rope_base", rope_base, "rope_theta", rope_theta, 10000.0)
    q, k, v, g, chunk_size, scale, rope_theta = _prepare(
        q, k, v, g, chunk_size, scale, rope_theta, cu_seqlens
    )
    with_out_lo = wants_out_lo(q, k, v, g)
    fwd = _rat_fwd if direct_call(q, k, v, g, cu_seqlens) else rat_fwd
    y, lse = fwd(q, k, v, g, chunk_size, scale, rope_theta, cu_seqlens, with_out_lo)[:2]
    return (y, lse) if return_lse else y


def rat_attn_with_states(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    *,
    chunk_size: int = 16,
    scale: float | None = None,
    rope_theta: float | None = 10000.0,
    cu_seqlens: Tensor | None = None,
    rope_base: float | None = DEPRECATED,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`rat_attn` that also returns ``(lse, k_states, v_states)`` (no gradient through
    them): the chunk-final states, un-rotated, ``[B, C, H, D]`` (see :func:`rat_state_chunks`;
    the last slot of a sequence holds its running state when T is not a multiple of L). For the
    lse alone use ``rat_attn(..., return_lse=True)``."""
    rope_theta = renamed(
        "rat_attn_with_states", "rope_base", rope_base, "rope_theta", rope_theta, 10000.0
    )
    q, k, v, g, chunk_size, scale, rope_theta = _prepare(
        q, k, v, g, chunk_size, scale, rope_theta, cu_seqlens
    )
    with_out_lo = wants_out_lo(q, k, v, g)
    fwd = _rat_fwd if direct_call(q, k, v, g, cu_seqlens) else rat_fwd
    return fwd(q, k, v, g, chunk_size, scale, rope_theta, cu_seqlens, with_out_lo)[:4]


# ----------------------------------------------------------------------------- decode

_MIN_SPLIT_STATES = 64  # fewer states per CTA would not pay for the combine pass


def rat_decode_splits(rows: int, chunks: int, sm_count: int) -> int:
    """CTAs per (sequence, head) row of :func:`rat_decode` over its C cached states: 1 when the
    B·H rows already fill the GPU (about 4 CTAs per SM), else enough splits of at least 64
    states to do so (flash-decoding), never an empty split."""
    want = -(-4 * sm_count // max(rows, 1))
    splits = min(want, chunks // _MIN_SPLIT_STATES)
    if splits <= 1:
        return 1
    per = -(-chunks // splits)
    return -(-chunks // per)


@functools.cache
def _sm_count(device_index: int) -> int:
    """Streaming multiprocessors of a GPU (fixed per process; the property lookup is not free)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@torch.library.custom_op(
    "longattn::rat_decode",
    mutates_args=("k_run", "v_run", "k_states", "v_states"),
    device_types=("cpu", "cuda"),
)
def rat_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    k_run: Tensor,
    v_run: Tensor,
    k_states: Tensor,
    v_states: Tensor,
    seen: int,
    chunk_size: int,
    scale: float,
    rope_theta: float | None,
) -> Tensor:
    """One-token RAT decode step on CUDA (the fused ``rat_decode`` kernel); returns y
    ``[B, 1, H, D]`` in q's dtype. The CPU decodes in PyTorch (:func:`longattn.nn.rat.rat_continue`)
    and this op raises ``ValueError`` there.

    q, k, v, g: ``[B, 1, H, D]`` (unit last stride) for the token at position ``seen`` of every
    sequence; ``k_run``/``v_run``: ``[B, H, D]`` float32 running state of its chunk (ignored when
    the token starts a chunk), updated in place; ``k_states``/``v_states``: ``[B, H, capacity, D]``
    in q's dtype, the chunk-final states already rotated by their chunk index: the first
    ``seen // chunk_size`` are attended to and, when the token ends its chunk, its rotated state
    is written to slot ``seen // chunk_size`` (which must be below the capacity).

    No autograd: decode runs under ``torch.no_grad()`` (the training path is :func:`rat_attn`).
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    partial = None
    if q.device.type == "cuda":
        B, _, H, D = q.shape
        sm_count = _sm_count(q.device.index)
        splits = rat_decode_splits(B * H, seen // chunk_size, sm_count)
        if splits > 1:
            partial = torch.empty(B, H, splits, D + 2, dtype=torch.float32, device=q.device)
    with native_call(q) as stream:
        _native.rat_decode(
            q.detach(),
            k.detach(),
            v.detach(),
            g.detach(),
            out,
            k_run,
            v_run,
            k_states,
            v_states,
            partial,
            seen,
            chunk_size,
            scale,
            rope_theta,
            stream,
        )
    return out


@rat_decode.register_fake
def _(q, k, v, g, k_run, v_run, k_states, v_states, seen, chunk_size, scale, rope_theta):
    return q.new_empty(q.shape)
