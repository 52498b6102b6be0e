"""Naive PyTorch references for RAT chunked attention (docs/api/rat.md).

Math (one sequence, one head, head dim D, chunk size L; chunk of t: c = t // L)::

    k~_t = g_t * k~_{t-1} + (1 - g_t) * k_t      (reset to 0 at every chunk start; same for v~)
    K~_j = k~ at offset L - 1 of chunk j          (chunk-final states, full chunks only)
    q, k~ rotated by the chunk angle c * base^(-2i/D) ("rotate_half" RoPE, optional)
    y_t  = softmax([s q_t.K~_j for j < c] + [s q_t.k~_t]) . [V~_j for j < c] + [v~_t]

Two formulations: :func:`rat_attn_reference`, the per-token recurrence (Python loop over time,
float64-capable, differentiable by plain autograd; the oracle of the tests), and
:func:`rat_attn_chunked`, the same math vectorised over chunks in torch eager (a loop over the
L offsets of a chunk, then dense [T, T/L] scores), used as the eager baseline in benchmarks.
"""

from __future__ import annotations

import torch

from .._deprecation import DEPRECATED, renamed

__all__ = ["rat_attn_reference", "rat_attn_chunked", "rat_rope"]


def rat_rope(x: torch.Tensor, chunk: torch.Tensor, base: float | None) -> torch.Tensor:
    """Rotates ``x [..., T, H, D]`` by the angle ``chunk[t] * base^(-2i/D)`` (rotate_half)."""
    if base is None:
        return x
    D = x.shape[-1]
    half = D // 2
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    inv = base ** (-torch.arange(half, dtype=torch.float64, device=x.device) * 2.0 / D)
    ang = chunk.to(torch.float64)[:, None] * inv[None, :]  # [T, D/2], angles in float64
    cos = torch.cos(ang).to(cd).repeat(1, 2)[:, None, :]  # [T, 1, D]
    sin = torch.sin(ang).to(cd).repeat(1, 2)[:, None, :]
    xc = x.to(cd)
    rot = torch.cat([-xc[..., half:], xc[..., :half]], dim=-1)
    return (xc * cos + rot * sin).to(x.dtype)


def _seqs(B: int, T: int, cu_seqlens) -> list[tuple[int, int, int]]:
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    if B != 1:
        raise ValueError("cu_seqlens requires B == 1")
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, a, e) for a, e in zip(cu[:-1], cu[1:], strict=True)]


def _check(q, k, v, g, chunk_size, rope_theta):
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape or g.shape != q.shape:
        raise ValueError("q, k, v, g must all be [B, T, H, D]")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if rope_theta is not None and q.shape[-1] % 2:
        raise ValueError("RoPE needs an even head dim")


def _attend(qs, ks_t, vs_t, L, scale, rope_theta):
    """One sequence: qs, ks_t, vs_t [n, H, D] (own states k~, v~, un-rotated)."""
    n = qs.shape[0]
    c = torch.arange(n, device=qs.device) // L
    qr = rat_rope(qs, c, rope_theta)
    kr = rat_rope(ks_t, c, rope_theta)
    own = (qr * kr).sum(-1, keepdim=True) * scale  # [n, H, 1]
    finals = torch.arange(L - 1, max(n, L - 1), L, device=qs.device)  # last offsets of full chunks
    kf, vf = kr[finals], vs_t[finals]  # [C, H, D] (kf rotated by its own chunk index)
    prev = torch.einsum("thd,jhd->thj", qr, kf) * scale  # [n, H, C]
    j = torch.arange(finals.shape[0], device=qs.device)
    visible = j[None, :] < c[:, None]  # [n, C]
    prev = prev.masked_fill(~visible[:, None, :], float("-inf"))
    p = torch.softmax(torch.cat([prev, own], dim=-1), dim=-1)
    # masked terms dropped, not multiplied by 0: a NaN/Inf in a later chunk must not leak back
    pv = p[..., :-1, None] * vf.transpose(0, 1)[None]  # [n, H, C, D]
    pv = torch.where(visible[:, None, :, None], pv, torch.zeros((), dtype=pv.dtype))
    y = pv.sum(dim=2) + p[..., -1:] * vs_t
    lse = torch.logsumexp(torch.cat([prev, own], dim=-1), dim=-1)
    return y, lse


def rat_attn_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    chunk_size: int = 16,
    scale: float | None = None,
    rope_theta: float | None = 10000.0,
    cu_seqlens: torch.Tensor | None = None,
    return_lse: bool = False,
    rope_base: float | None = DEPRECATED,
):
    """Per-token RAT reference. q, k, v, g: ``[B, T, H, D]``; computes in the promoted dtype of
    the inputs (pass float64 tensors for the oracle). Returns y ``[B, T, H, D]`` (and the lse
    ``[B, T, H]`` with ``return_lse``). ``rope_base``: deprecated alias of ``rope_theta``."""
    rope_theta = renamed(
        "rat_attn_reference", "rope_base", rope_base, "rope_theta", rope_theta, 10000.0
    )
    _check(q, k, v, g, chunk_size, rope_theta)
    B, T, H, D = q.shape
    L = chunk_size
    s = D**-0.5 if scale is None else scale
    cd = torch.promote_types(torch.promote_types(q.dtype, g.dtype), torch.float32)
    ys = torch.zeros(B, T, H, D, dtype=cd, device=q.device)
    lses = torch.zeros(B, T, H, dtype=cd, device=q.device)
    rows_y, rows_l = [], []
    for b, a, e in _seqs(B, T, cu_seqlens):
        qs, kk, vv, gg = (x[b, a:e].to(cd) for x in (q, k, v, g))
        hk = torch.zeros(H, D, dtype=cd, device=q.device)
        hv = torch.zeros_like(hk)
        kt, vt = [], []
        for t in range(e - a):
            if t % L == 0:
                hk = torch.zeros_like(hk)
                hv = torch.zeros_like(hv)
            hk = gg[t] * hk + (1 - gg[t]) * kk[t]
            hv = gg[t] * hv + (1 - gg[t]) * vv[t]
            kt.append(hk)
            vt.append(hv)
        if e == a:
            continue
        y, lse = _attend(qs, torch.stack(kt), torch.stack(vt), L, s, rope_theta)
        rows_y.append((b, a, e, y))
        rows_l.append((b, a, e, lse))
    # assemble without in-place writes into a leaf-dependent tensor (keeps autograd simple)
    if cu_seqlens is None:
        if T > 0 and B > 0:
            ys = torch.stack([r[3] for r in rows_y])
            lses = torch.stack([r[3] for r in rows_l])
    elif rows_y:
        ys = torch.cat([r[3] for r in rows_y])[None]
        lses = torch.cat([r[3] for r in rows_l])[None]
    y = ys.to(q.dtype)
    return (y, lses) if return_lse else y


def _scan_chunks(x, g, L):
    """In-chunk scan of [B, T, H, D] x with gate g (vectorised over chunks, loop over offsets)."""
    B, T, H, D = x.shape
    C = -(-T // L)
    pad = C * L - T
    if pad:
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        g = torch.nn.functional.pad(g, (0, 0, 0, 0, 0, pad))
    xs = x.view(B, C, L, H, D)
    gs = g.view(B, C, L, H, D)
    h = torch.zeros(B, C, H, D, dtype=x.dtype, device=x.device)
    out = []
    for l in range(L):  # noqa: E741
        h = gs[:, :, l] * h + (1 - gs[:, :, l]) * xs[:, :, l]
        out.append(h)
    return torch.stack(out, dim=2).view(B, C * L, H, D)[:, :T]


def rat_attn_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    chunk_size: int = 16,
    scale: float | None = None,
    rope_theta: float | None = 10000.0,
    rope_base: float | None = DEPRECATED,
) -> torch.Tensor:
    """The same math in torch eager without a token loop (no cu_seqlens), in q's dtype
    (g cast to it). Dense [T, T/L] scores per head: O(T^2/L) memory. ``rope_base``: deprecated
    alias of ``rope_theta``."""
    rope_theta = renamed(
        "rat_attn_chunked", "rope_base", rope_base, "rope_theta", rope_theta, 10000.0
    )
    _check(q, k, v, g, chunk_size, rope_theta)
    B, T, H, D = q.shape
    L = chunk_size
    s = D**-0.5 if scale is None else scale
    g = g.to(q.dtype)
    kt = _scan_chunks(k, g, L)
    vt = _scan_chunks(v, g, L)
    c = torch.arange(T, device=q.device) // L
    qr = rat_rope(q, c, rope_theta)
    kr = rat_rope(kt, c, rope_theta)
    own = (qr * kr).sum(-1) * s  # [B, T, H]
    finals = torch.arange(L - 1, max(T, L - 1), L, device=q.device)
    kf = kr[:, finals].transpose(1, 2)  # [B, H, C, D]
    vf = vt[:, finals].transpose(1, 2)
    prev = torch.matmul(qr.transpose(1, 2), kf.transpose(-1, -2)) * s  # [B, H, T, C]
    j = torch.arange(finals.shape[0], device=q.device)
    prev = prev.masked_fill(~(j[None, :] < c[:, None]), float("-inf"))
    scores = torch.cat([prev, own.transpose(1, 2)[..., None]], dim=-1)
    p = torch.softmax(scores, dim=-1)
    y = torch.matmul(p[..., :-1], vf).transpose(1, 2) + p[..., -1].transpose(1, 2)[..., None] * vt
    return y
