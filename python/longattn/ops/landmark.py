"""landmark_attn: block attention gated by landmark tokens, with top-k block retrieval.

Math and conventions: ``docs/api/landmark.md``. The forward is one
FlashAttention-style pass of the native kernel over "effective logits" (landmark gate + inner
block log-softmax); it saves the log-sum-exp per (token, head) and, for 16-bit outputs a backward
will need, the output's rounding residual out_lo (one more output-sized tensor): the backward's
Δ = rowsum(dO ∘ (out + out_lo)) stays accurate for nearly one-hot rows. The backward recomputes the
scores tile by tile (dq over query tiles, dk/dv over key tiles). CPU (float64/32/16, bf16) and
CUDA (float32 via 3xTF32, float16, bfloat16; head dims up to 128, any block size ≥ 2; blocks
longer than a 64-key tile take a statistics pass per block) kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._deprecation import keyword_only_options
from .._runtime import (
    check_cu_seqlens,
    check_rank,
    direct_call,
    native_call,
    state_dtype,
    unit_last_stride,
    wants_out_lo,
)

__all__ = ["insert_landmarks", "landmark_attn", "landmark_topk_blocks", "remove_landmarks"]


def _empty(shape, like: Tensor, dtype, packed: bool) -> Tensor:
    """Output buffer. With cu_seqlens on CUDA the kernels only write tokens inside the packed
    sequences (the offsets are never read on the host), so the rest is zero-initialised."""
    if packed and like.device.type == "cuda":
        return torch.zeros(shape, dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


def _landmark_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor | None,
    block_size: int,
    scale: float,
    cu_seqlens: Tensor | None,
    with_out_lo: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    packed = cu_seqlens is not None
    out = _empty(q.shape[:3] + v.shape[3:], q, q.dtype, packed)
    lse = _empty(q.shape[:3], q, state_dtype(q.dtype), packed)
    out_lo = _empty(_out_lo_shape(out, with_out_lo), q, q.dtype, packed)
    with native_call(q) as stream:
        _native.landmark_fwd(
            q.detach(),
            k.detach(),
            v.detach(),
            out,
            out_lo if with_out_lo else None,
            lse,
            block_indices,
            block_size,
            scale,
            cu_seqlens,
            stream,
        )
    return out, lse, out_lo


# eager calls that need no dispatcher run _landmark_fwd directly (direct_call)
landmark_fwd = torch.library.custom_op(
    "longattn::landmark_fwd", _landmark_fwd, mutates_args=(), device_types=("cpu", "cuda")
)


@landmark_fwd.register_fake
def _(q, k, v, block_indices, block_size, scale, cu_seqlens, with_out_lo=False):
    out = q.new_empty(q.shape[:3] + v.shape[3:])
    lse = q.new_empty(q.shape[:3], dtype=state_dtype(q.dtype))
    return out, lse, q.new_empty(_out_lo_shape(out, with_out_lo))


def _out_lo_shape(out: Tensor, with_out_lo: bool) -> tuple[int, ...]:
    """out's rounding residual (16-bit outputs that a backward will need), else 0 elements
    (a custom op cannot return None)."""
    return tuple(out.shape) if with_out_lo else (0,)


@torch.library.custom_op("longattn::landmark_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def landmark_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    out_lo: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    block_indices: Tensor | None,
    block_size: int,
    scale: float,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    sdt = state_dtype(q.dtype)
    grad_out = unit_last_stride(grad_out)
    # Δ from the output before its 16-bit rounding (out + out_lo) when the forward kept out_lo
    o = out.to(sdt) + out_lo.to(sdt) if out_lo.numel() else out.to(sdt)
    delta = (grad_out.to(sdt) * o).sum(dim=-1)
    packed = cu_seqlens is not None
    dq = _empty(q.shape, q, q.dtype, packed)
    dk = _empty(k.shape, q, q.dtype, packed)
    dv = _empty(v.shape, q, q.dtype, packed)
    with native_call(q) as stream:
        _native.landmark_bwd(
            q.detach(),
            k.detach(),
            v.detach(),
            grad_out.detach(),
            lse.detach(),
            delta,
            dq,
            dk,
            dv,
            block_indices,
            block_size,
            scale,
            cu_seqlens,
            stream,
        )
    return dq, dk, dv


@landmark_bwd.register_fake
def _(q, k, v, out, out_lo, lse, grad_out, block_indices, block_size, scale, cu_seqlens):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, block_indices, block_size, scale, cu_seqlens, *_ = inputs
    out, lse, out_lo = output
    ctx.block_size = block_size
    ctx.scale = scale
    ctx.save_for_backward(q, k, v, out, out_lo, lse, block_indices, cu_seqlens)


def _backward(ctx, grad_out, grad_lse, grad_out_lo):
    q, k, v, out, out_lo, lse, block_indices, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = landmark_bwd(
        q, k, v, out, out_lo, lse, grad_out, block_indices, ctx.block_size, ctx.scale, cu_seqlens
    )
    return dq, dk, dv, None, None, None, None, None


landmark_fwd.register_autograd(_backward, setup_context=_setup_context)


def _landmark_topk(
    q: Tensor, k: Tensor, block_size: int, topk: int, scale: float, cu_seqlens: Tensor | None
) -> Tensor:
    if cu_seqlens is not None and q.device.type == "cuda":
        out = torch.full(q.shape[:2] + (k.shape[2], topk), -1, dtype=torch.int32, device=q.device)
    else:
        out = torch.empty(q.shape[:2] + (k.shape[2], topk), dtype=torch.int32, device=q.device)
    with native_call(q) as stream:
        _native.landmark_topk(q, k, out, block_size, scale, cu_seqlens, stream)
    return out


# eager calls that need no dispatcher run _landmark_topk directly (direct_call)
landmark_topk = torch.library.custom_op(
    "longattn::landmark_topk", _landmark_topk, mutates_args=(), device_types=("cpu", "cuda")
)


@landmark_topk.register_fake
def _(q, k, block_size, topk, scale, cu_seqlens):
    return q.new_empty(q.shape[:2] + (k.shape[2], topk), dtype=torch.int32)


def _check_common(q, k, v, block_size, cu_seqlens):
    check_rank(q, "q", 4, "[B, Tq, Hq, D]")
    check_rank(k, "k", 4, "[B, Tk, Hkv, D]")
    check_rank(v, "v", 4, "[B, Tk, Hkv, D]")
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"block_size: expected an int, got {type(block_size).__name__}")
    if block_size < 2:
        raise ValueError(
            f"block_size: must be at least 2 (one ordinary token and the landmark), "
            f"got {block_size}"
        )
    check_cu_seqlens(cu_seqlens)


def landmark_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    block_indices: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal landmark attention (grouped softmax over landmark-gated blocks).

    Position p with ``p % block_size == block_size − 1`` holds a landmark token; query i attends
    to its own block directly and to every earlier block j through the gate
    ``exp(s_{i,ℓ_j}) / Z_i`` times a softmax inside block j (landmarks get weight 0).

    Args:
        q: ``[B, Tq, Hq, D]``; k: ``[B, Tk, Hkv, D]``; v: ``[B, Tk, Hkv, E]``, Tk ≥ Tq (query i
            sits at position ``i + Tk − Tq``), Hq % Hkv == 0. Any strides with a unit last stride
            (others are copied). D, E in 1..256.
        block_size: landmark block length ≥ 2 (the landmark included), any T.
        scale: score scale, default ``D ** -0.5``.
        cu_seqlens: int32/int64 ``[N + 1]`` cumulative starts of packed sequences (B = 1, Tq = Tk).
        block_indices: int32 or int64 ``[B, Tq, Hkv, n]`` (retrieval mode): only the listed
            earlier blocks take part; −1 and blocks that are not earlier are skipped; the
            current block always takes part. No gradient.
        return_lse: also return the log-sum-exp of the grouped softmax.

    Returns:
        o ``[B, Tq, Hq, E]`` in q's dtype, or ``(o, lse)`` with ``return_lse=True``: lse
        ``[B, Tq, Hq]`` float32 (float64 for float64), the log of the row's normaliser over the
        effective logits (no gradient).
    """
    _check_common(q, k, v, block_size, cu_seqlens)
    if block_indices is not None:
        check_rank(block_indices, "block_indices", 4, "[B, Tq, Hkv, n]")
        block_indices = _int32_indices(block_indices.detach())
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    with_out_lo = wants_out_lo(q, k, v)
    fwd = _landmark_fwd if direct_call(q, k, v, block_indices, cu_seqlens) else landmark_fwd
    out, lse, _ = fwd(
        q, k, v, block_indices, int(block_size), float(scale), cu_seqlens, with_out_lo
    )
    return (out, lse) if return_lse else out


_INT32_MAX = 2**31 - 1


def _int32_indices(block_indices: Tensor) -> Tensor:
    """The kernels read int32 block indices. int64 ones convert without wrapping: an entry
    outside [0, 2^31) can never name an earlier block, and the kernels skip it like −1, so it
    becomes −1 (a plain cast would wrap 2^32 + 1 to block 1)."""
    if block_indices.dtype == torch.int32:
        return block_indices
    if block_indices.dtype != torch.int64:
        raise TypeError(f"block_indices: expected dtype int32 or int64, got {block_indices.dtype}")
    ok = (block_indices >= 0) & (block_indices <= _INT32_MAX)
    return torch.where(ok, block_indices, -1).to(torch.int32)


def landmark_topk_blocks(
    q: Tensor,
    k: Tensor,
    *,
    block_size: int = 64,
    topk: int,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Top-k earlier full blocks per (token, kv head), by landmark logit ``s_{i,ℓ_j}`` (max over
    the query heads of a kv group), sorted ascending, −1 padded; int32 ``[B, Tq, Hkv, topk]``.
    Ties keep the lower block index. No gradient."""
    check_rank(q, "q", 4, "[B, Tq, Hq, D]")
    check_rank(k, "k", 4, "[B, Tk, Hkv, D]")
    _check_common(q, k, k, block_size, cu_seqlens)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    q, k = unit_last_stride(q.detach()), unit_last_stride(k.detach())
    topk_op = _landmark_topk if direct_call(q, k, cu_seqlens) else landmark_topk
    return topk_op(q, k, int(block_size), int(topk), float(scale), cu_seqlens)


@keyword_only_options
def insert_landmarks(input_ids: Tensor, *, landmark_id: int, block_size: int) -> Tensor:
    """``[B, N]`` token ids -> ``[B, N + N // (block_size − 1)]``: a ``landmark_id`` after every
    ``block_size − 1`` ordinary tokens (so position p is a landmark iff p % block_size ==
    block_size − 1). Passing ``landmark_id``/``block_size`` positionally is deprecated."""
    check_rank(input_ids, "input_ids", 2, "[B, N]")
    if block_size < 2:
        raise ValueError(f"block_size: must be at least 2, got {block_size}")
    b, n = input_ids.shape
    m = block_size - 1
    n_lm = n // m
    total = n + n_lm
    pos = torch.arange(total, device=input_ids.device)
    is_lm = pos % block_size == block_size - 1
    out = torch.full((b, total), landmark_id, dtype=input_ids.dtype, device=input_ids.device)
    out[:, ~is_lm] = input_ids
    return out


@keyword_only_options
def remove_landmarks(x: Tensor, *, block_size: int, dim: int = 1) -> Tensor:
    """Inverse of ``insert_landmarks`` along ``dim`` (logits, labels, hidden states): drops every
    position p with ``p % block_size == block_size − 1``. Passing ``block_size``/``dim``
    positionally is deprecated."""
    if block_size < 2:
        raise ValueError(f"block_size: must be at least 2, got {block_size}")
    pos = torch.arange(x.shape[dim], device=x.device)
    keep = (pos % block_size != block_size - 1).nonzero().squeeze(-1)
    return x.index_select(dim, keep)
