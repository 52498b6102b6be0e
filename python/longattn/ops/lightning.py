"""lightning_attn: causal linear attention with per-head decay (Lightning Attention-2).

Math and conventions: ``docs/api/lightning.md``. Forward is one blocked pass of the native
kernel; backward is three (dq forward, dk and dv reverse) plus the slope gradient assembled here
from per-sequence partial sums.
"""

from __future__ import annotations

import math

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
)

__all__ = ["lightning_attn", "lightning_slopes"]


def _num_seqs(q: Tensor, cu_seqlens: Tensor | None) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _state_shape(q: Tensor, v: Tensor, cu_seqlens: Tensor | None) -> tuple[int, int, int, int]:
    return (_num_seqs(q, cu_seqlens), q.shape[2], q.shape[3], v.shape[3])


def _lightning_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    initial_state: Tensor | None,
    scale: float,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor]:
    out = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    final_state = torch.empty(
        _state_shape(q, v, cu_seqlens), dtype=state_dtype(q.dtype), device=q.device
    )
    with native_call(q) as stream:
        _native.lightning_fwd(
            q.detach(),
            k.detach(),
            v.detach(),
            slopes.detach(),
            out,
            None if initial_state is None else initial_state.detach(),
            final_state,
            scale,
            cu_seqlens,
            stream,
        )
    return out, final_state


# eager calls that need no dispatcher run _lightning_fwd directly (direct_call)
lightning_fwd = torch.library.custom_op(
    "longattn::lightning_fwd", _lightning_fwd, mutates_args=(), device_types=("cpu", "cuda")
)


@lightning_fwd.register_fake
def _(q, k, v, slopes, initial_state, scale, cu_seqlens):
    out = q.new_empty(v.shape)
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1
    final_state = q.new_empty((n, q.shape[2], q.shape[3], v.shape[3]), dtype=state_dtype(q.dtype))
    return out, final_state


@torch.library.custom_op("longattn::lightning_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def lightning_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    grad_out: Tensor,
    initial_state: Tensor | None,
    final_state: Tensor,
    grad_final_state: Tensor | None,
    scale: float,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    sdt = state_dtype(q.dtype)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=q.dtype, device=q.device)
    dv = torch.empty(v.shape, dtype=q.dtype, device=q.device)
    d_state = torch.empty(final_state.shape, dtype=sdt, device=q.device)
    n, h = final_state.shape[0], final_state.shape[1]
    partial_q = torch.zeros((n, h, _native.DOT_SLOTS), dtype=sdt, device=q.device)
    partial_k = torch.zeros_like(partial_q)
    grad_out = unit_last_stride(grad_out)
    with native_call(q) as stream:
        _native.lightning_bwd(
            q.detach(),
            k.detach(),
            v.detach(),
            slopes.detach(),
            grad_out.detach(),
            None if initial_state is None else initial_state.detach(),
            None if grad_final_state is None else grad_final_state.detach(),
            dq,
            dk,
            dv,
            d_state,
            partial_q,
            partial_k,
            scale,
            cu_seqlens,
            stream,
        )
    # d loss / d log λ = Σ_t (t+1)(q_t·dq_t − k_t·dk_t) + L·⟨dS_T, S_T⟩ per sequence; s = −log λ.
    d_log_decay = (partial_q - partial_k).sum(dim=(0, 2))
    if grad_final_state is not None:
        if cu_seqlens is None:
            lengths = torch.full((n,), q.shape[1], dtype=sdt, device=q.device)
        else:
            lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(sdt)
        inner = (grad_final_state.to(sdt) * final_state).sum(dim=(2, 3))
        d_log_decay = d_log_decay + (lengths[:, None] * inner).sum(dim=0)
    d_slopes = (-d_log_decay).to(slopes.dtype)
    return dq, dk, dv, d_slopes, d_state


@lightning_bwd.register_fake
def _(q, k, v, slopes, grad_out, initial_state, final_state, grad_final_state, scale, cu_seqlens):
    return (
        torch.empty_like(q),
        torch.empty_like(k),
        torch.empty_like(v),
        torch.empty_like(slopes),
        torch.empty_like(final_state),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, initial_state, scale, cu_seqlens = inputs
    _, final_state = output
    # An unused final state then arrives as None, and the reverse passes skip its term.
    ctx.set_materialize_grads(False)
    ctx.scale = scale
    ctx.has_initial_state = initial_state is not None
    ctx.save_for_backward(q, k, v, slopes, initial_state, final_state, cu_seqlens)


def _backward(ctx, grad_out, grad_final_state):
    q, k, v, slopes, initial_state, final_state, cu_seqlens = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(v.shape, dtype=q.dtype, device=q.device)
    # The slope gradient is a cancelling sum (Σ (t+1)(q·dq − k·dk) + L·⟨dS_T, S_T⟩, terms ~T
    # times the result): 16-bit tensor-core products leave it tens of percent wrong, so a
    # backward that needs it runs in float32 on the same (exactly representable) values, with
    # S_T recomputed in float32 too (the 16-bit forward rounds its state updates).
    wide = ctx.needs_input_grad[3] and q.dtype in (torch.float16, torch.bfloat16)
    cast = Tensor.float if wide else lambda x: x
    if wide and grad_final_state is not None:
        _, final_state = lightning_fwd(
            cast(q), cast(k), cast(v), slopes, initial_state, ctx.scale, cu_seqlens
        )
    dq, dk, dv, d_slopes, d_state = lightning_bwd(
        cast(q),
        cast(k),
        cast(v),
        slopes,
        cast(grad_out),
        initial_state,
        final_state,
        grad_final_state,
        ctx.scale,
        cu_seqlens,
    )
    dq, dk, dv = dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)  # float32 only when wide
    return dq, dk, dv, d_slopes, (d_state if ctx.has_initial_state else None), None, None


lightning_fwd.register_autograd(_backward, setup_context=_setup_context)


def lightning_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    *,
    scale: float = 1.0,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention with per-head exponential decay λ_h = exp(−slopes[h]).

    Linear attention has no softmax and so no lse: unlike the softmax ops (``return_lse``), its
    second output is the recurrent state ``S``, the one thing a caller needs to continue a
    sequence (``initial_state``); it is None unless ``output_final_state``.

    ``S_t = λ S_{t−1} + k_t v_tᵀ`` (``S_{−1}`` = ``initial_state`` or 0) and
    ``o_t = scale · q_tᵀ S_t``.

    Args:
        q, k: ``[B, T, H, D]``; v: ``[B, T, H, E]``; any strides with a unit last stride
            (others are copied). D, E in 1..256.
        slopes: ``[H]`` decay slopes ≥ 0 (cast to float32, float64 for float64 inputs).
        scale: output scale (1.0 is the Lightning/MiniMax convention; fla uses ``D ** -0.5``).
        initial_state: ``[B, H, D, E]`` (``[N, H, D, E]`` with ``cu_seqlens``), float32
            (float64 for float64 inputs).
        output_final_state: also return ``S_{T−1}`` per sequence.
        cu_seqlens: int32/int64 ``[N + 1]`` cumulative sequence starts of a packed batch (B = 1).

    Returns:
        ``(o, final_state)``: o ``[B, T, H, E]`` in q's dtype; final_state or None.
    """
    check_rank(q, "q", 4, "[B, T, H, D]")
    check_rank(k, "k", 4, "[B, T, H, D]")
    check_rank(v, "v", 4, "[B, T, H, E]")
    check_rank(slopes, "slopes", 1, "[H]")
    check_rank(initial_state, "initial_state", 4, "[N, H, D, E]")
    check_cu_seqlens(cu_seqlens)
    if slopes.is_floating_point():
        slopes = slopes.to(state_dtype(q.dtype))
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    fwd = (
        _lightning_fwd if direct_call(q, k, v, slopes, initial_state, cu_seqlens) else lightning_fwd
    )
    out, final_state = fwd(q, k, v, slopes, initial_state, float(scale), cu_seqlens)
    return out, (final_state if output_final_state else None)


@keyword_only_options
def lightning_slopes(
    num_heads: int, *, layer_idx: int | None = None, num_layers: int | None = None
) -> Tensor:
    """ALiBi-style decay slopes per head, optionally scaled per layer (TransNormerLLM/MiniMax).
    Passing ``layer_idx``/``num_layers`` positionally is deprecated."""
    if num_heads < 1:
        raise ValueError(f"num_heads: must be at least 1, got {num_heads}")

    def ladder(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    p = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = ladder(p) + ladder(2 * p)[0::2][: num_heads - p]
    out = torch.tensor(slopes, dtype=torch.float32)
    if layer_idx is not None and num_layers is not None:
        factor = 1.0 - layer_idx / (num_layers - 1) + 1e-5 if num_layers > 1 else 1.0 + 1e-5
        out = out * factor
    return out
