"""Naive PyTorch references for lightning attention (docs/api/lightning.md).

These are the oracles for the tests: slow, simple, differentiable by plain autograd, and
float64-capable. Nothing here is meant to be fast.

Math (one batch element, one head; decay ``lam = exp(-s)``, scale ``c``)::

    S_t = lam * S_{t-1} + k_t v_t^T        (S_{-1} = S0, zero unless given)
    o_t = c * q_t^T S_t
    final_state = S_{T-1}

Two independent formulations are given: the per-token recurrence and the quadratic masked
(parallel) form ``O = c (Q K^T * M) V + c diag(lam^(t+1)) Q S0``.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "lightning_attn_recurrent",
    "lightning_attn_parallel",
    "lightning_slopes_reference",
]


def _default_state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(q, k, v, slopes, initial_state, cu_seqlens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("q, k, v must be 4-D [B, T, H, D|E]")
    B, T, H, D = q.shape
    if k.shape != (B, T, H, D):
        raise ValueError(f"k has shape {tuple(k.shape)}, expected {(B, T, H, D)}")
    if v.shape[:3] != (B, T, H):
        raise ValueError(f"v has shape {tuple(v.shape)}, expected {(B, T, H)} + (E,)")
    E = v.shape[3]
    if slopes.shape != (H,):
        raise ValueError(f"slopes has shape {tuple(slopes.shape)}, expected {(H,)}")
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError("cu_seqlens requires B == 1")
        n = cu_seqlens.numel() - 1
    else:
        n = B
    if initial_state is not None and initial_state.shape != (n, H, D, E):
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)}, expected {(n, H, D, E)}"
        )
    return B, T, H, D, E


def _seq_bounds(cu_seqlens) -> list[tuple[int, int]]:
    cu = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(cu[:-1], cu[1:], strict=True))


def _recurrent_dense(q, k, v, slopes, scale, s0, state_dtype):
    """Recurrence over time for dense [B, T, H, *] inputs. s0: [B, H, D, E] or None.

    Arithmetic runs in ``state_dtype``; for 16-bit inputs every product is rounded to the
    input dtype where a native low-precision kernel would round it (the k v^T outer product,
    the state read for q^T S, the output), so that the low-precision result is the error
    yardstick for kernels. For float32/float64 inputs those roundings are no-ops.
    """
    B, T, H, D = q.shape
    E = v.shape[-1]
    dtype = q.dtype
    cd = state_dtype

    def rnd(x):
        return x if dtype == cd else x.to(dtype).to(cd)

    qc, kc, vc = q.to(cd), k.to(cd), v.to(cd)
    lam = torch.exp(-slopes.to(cd))[None, :, None, None]  # [1, H, 1, 1]
    if s0 is None:
        state = q.new_zeros((B, H, D, E), dtype=cd)
    else:
        state = s0.to(cd)
    outs = []
    for t in range(T):
        kv = rnd(kc[:, t, :, :, None] * vc[:, t, :, None, :])  # [B, H, D, E]
        state = lam * state + kv
        o_t = torch.einsum("bhd,bhde->bhe", qc[:, t], rnd(state))
        outs.append(o_t * scale)
    if T == 0:
        o = v.new_zeros((B, 0, H, E), dtype=cd)
    else:
        o = torch.stack(outs, dim=1)
    return o.to(dtype), state


def lightning_attn_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    state_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token recurrence (vectorised over batch and heads, Python loop over time).

    q, k: [B, T, H, D]; v: [B, T, H, E]; slopes: [H]; initial_state: [B, H, D, E]
    ([N, H, D, E] with cu_seqlens, B == 1). Products are rounded to q's dtype; the state is kept in
    ``state_dtype`` (default float64 for float64 inputs, else float32). Returns
    ``(o [B, T, H, E] in q's dtype, final_state in state_dtype)``.

    With 16-bit inputs this is the "same reference computed in that low precision" of the
    numerical checks: products rounded to the input dtype, state accumulated in float32.
    """
    _check_shapes(q, k, v, slopes, initial_state, cu_seqlens)
    state_dtype = state_dtype or _default_state_dtype(q.dtype)
    if cu_seqlens is None:
        return _recurrent_dense(q, k, v, slopes, scale, initial_state, state_dtype)
    outs, states = [], []
    for i, (a, b) in enumerate(_seq_bounds(cu_seqlens)):
        s0 = None if initial_state is None else initial_state[i : i + 1]
        o_i, s_i = _recurrent_dense(q[:, a:b], k[:, a:b], v[:, a:b], slopes, scale, s0, state_dtype)
        outs.append(o_i)
        states.append(s_i)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


def _parallel_dense(q, k, v, slopes, scale, s0, state_dtype):
    """Quadratic masked form for dense [B, T, H, *] inputs. s0: [B, H, D, E] or None."""
    B, T, H, D = q.shape
    dtype = q.dtype
    # decay factors are computed in the (float32/float64) state dtype, then cast: positions
    # are not exact in a 16-bit dtype
    s = slopes.to(state_dtype)
    pos = torch.arange(T, device=q.device, dtype=state_dtype)
    diff = pos[:, None] - pos[None, :]  # t - j
    causal = diff >= 0
    # decay mask M[h, t, j] = exp(-s_h (t - j)) for t >= j, else 0 (exponents never positive)
    mask = (torch.exp(-s[:, None, None] * diff.clamp(min=0)[None]) * causal[None]).to(dtype)
    qh = q.permute(0, 2, 1, 3)  # [B, H, T, D]
    kh = k.permute(0, 2, 1, 3)
    vh = v.permute(0, 2, 1, 3)  # [B, H, T, E]
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * mask[None]
    o = torch.matmul(scores, vh)  # [B, H, T, E]
    # final state: lam^T S0 + sum_j lam^(T-1-j) k_j v_j^T
    key_decay = torch.exp(-s[:, None] * (T - 1 - pos)[None]).to(dtype)  # [H, T]
    state = torch.matmul((kh * key_decay[None, :, :, None]).transpose(-1, -2), vh)
    state = state.to(state_dtype)
    if s0 is not None:
        query_decay = torch.exp(-s[:, None] * (pos + 1)[None]).to(dtype)  # [H, T]
        o = o + torch.matmul(qh * query_decay[None, :, :, None], s0.to(dtype))
        state = state + torch.exp(-s * T)[None, :, None, None] * s0.to(state_dtype)
    o = (o * scale).permute(0, 2, 1, 3)
    return o.to(dtype), state.to(state_dtype)


def lightning_attn_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    *,
    state_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic masked form: ``O = c (Q K^T * M) V + c diag(lam^(t+1)) Q S0``.

    Same arguments and results as :func:`lightning_attn_recurrent`; everything is computed in
    q's dtype (O(T^2) memory). The final state is ``lam^T S0 + sum_j lam^(T-1-j) k_j v_j^T``.
    """
    _check_shapes(q, k, v, slopes, initial_state, cu_seqlens)
    state_dtype = state_dtype or _default_state_dtype(q.dtype)
    if cu_seqlens is None:
        return _parallel_dense(q, k, v, slopes, scale, initial_state, state_dtype)
    outs, states = [], []
    for i, (a, b) in enumerate(_seq_bounds(cu_seqlens)):
        s0 = None if initial_state is None else initial_state[i : i + 1]
        o_i, s_i = _parallel_dense(q[:, a:b], k[:, a:b], v[:, a:b], slopes, scale, s0, state_dtype)
        outs.append(o_i)
        states.append(s_i)
    return torch.cat(outs, dim=1), torch.cat(states, dim=0)


def lightning_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    *,
    chunk: int = 64,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocked form in torch eager (batched matmuls per chunk, no token loop), in ``dtype``.

    The baseline the native kernels are timed against (``dtype=torch.float32``) and a third,
    O(T·chunk)-memory oracle. Returns (o in q's dtype, final state in ``dtype``).
    """
    _check_shapes(q, k, v, slopes, initial_state, None)
    B, T, H, D = q.shape
    E = v.shape[-1]
    out_dtype = q.dtype
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (q, k, v))
    s = slopes.to(device=q.device, dtype=dtype).reshape(H)
    S = initial_state.to(dtype) if initial_state is not None else q.new_zeros(B, H, D, E)
    idx = torch.arange(chunk, device=q.device, dtype=dtype)
    outs = []
    for t0 in range(0, T, chunk):
        c = min(chunk, T - t0)
        p = idx[:c]
        qc, kc, vc = q[:, :, t0 : t0 + c], k[:, :, t0 : t0 + c], v[:, :, t0 : t0 + c]
        diff = p[:, None] - p[None, :]
        mask = torch.exp(-s[:, None, None] * diff.clamp(min=0)) * (diff >= 0)
        intra = ((qc @ kc.transpose(-1, -2)) * mask) @ vc
        inter = torch.exp(-s[:, None, None] * (p[None, :, None] + 1)) * (qc @ S)
        outs.append(scale * (intra + inter))
        kdec = torch.exp(-s[:, None, None] * (c - 1 - p)[None, :, None])
        S = torch.exp(-s * c)[:, None, None] * S + (kc * kdec).transpose(-1, -2) @ vc
    o = torch.cat(outs, dim=2).transpose(1, 2).to(out_dtype) if outs else q.new_empty(B, 0, H, E)
    return o, S


def lightning_slopes_reference(
    num_heads: int, layer_idx: int | None = None, num_layers: int | None = None
) -> torch.Tensor:
    """The ALiBi-style slope ladder of docs/api/lightning.md, computed in float64 -> float32.

    Power of two H: s_h = 2^(-8 (h + 1) / H). Otherwise the ladder of P = 2^floor(log2 H)
    heads followed by the even-indexed entries of the 2P ladder until there are H slopes.
    With layer_idx and num_layers, every slope is multiplied by
    1 - layer_idx / (num_layers - 1) + 1e-5 (1 + 1e-5 when num_layers <= 1).
    """
    if num_heads < 1:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")

    def ladder(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

    p = 1
    while p * 2 <= num_heads:
        p *= 2
    slopes = ladder(p)
    if p != num_heads:
        extra = ladder(2 * p)[0::2]
        slopes += extra[: num_heads - p]
    if layer_idx is not None and num_layers is not None:
        if num_layers <= 1:
            factor = 1.0 + 1e-5
        else:
            factor = 1.0 - layer_idx / (num_layers - 1) + 1e-5
        slopes = [x * factor for x in slopes]
    assert len(slopes) == num_heads and not any(math.isnan(x) for x in slopes)
    return torch.tensor(slopes, dtype=torch.float64).to(torch.float32)
