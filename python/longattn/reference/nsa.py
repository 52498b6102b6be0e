"""Naive float64-capable PyTorch references for Native Sparse Attention (docs/api/nsa.md).

Per-token, per-sequence loops written straight from the documented math: slow, simple,
differentiable by plain autograd (all but the block selection, which has no gradient). The
oracles for ``tests/test_nsa.py``.

Notation: q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]``, G = Hq / Hkv, query head h reads kv head
h // G; l = kernel_size, d = kernel_stride, B_K = block_size, n = topk, W = window_size.
With ``cu_seqlens`` (B = 1) every sequence is independent and the compressed tensors are packed
per sequence in order (window counts derived from the sequence lengths).

A second, independent formulation (dense masked softmax) is given for the attention branches:
``nsa_dense_masked_attn`` with the masks of ``nsa_selection_mask``, ``sliding_window_mask`` and
``compressed_visibility_mask``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "compressed_visibility_mask",
    "nsa_attn_reference",
    "nsa_compress_reference",
    "nsa_compressed_attn_reference",
    "nsa_dense_masked_attn",
    "nsa_num_windows",
    "nsa_selected_attn_reference",
    "nsa_selection_mask",
    "nsa_topk_blocks_reference",
    "sliding_window_attn_reference",
    "sliding_window_mask",
]


def nsa_num_windows(length: int, kernel_size: int, kernel_stride: int) -> int:
    """C = ⌊(T − l)/d⌋ + 1 when T ≥ l, else 0 (a trailing partial window is dropped)."""
    return (length - kernel_size) // kernel_stride + 1 if length >= kernel_size else 0


def _num_visible(t: int, kernel_size: int, kernel_stride: int) -> int:
    """Windows i visible to position t: t ≥ i·d + l − 1."""
    return (t + 1 - kernel_size) // kernel_stride + 1 if t + 1 >= kernel_size else 0


def _seqs(B: int, T: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, first token, length) per sequence."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return [(0, s, e - s) for s, e in zip(cu[:-1], cu[1:], strict=True)]


def _cmp_offsets(seqs, kernel_size, kernel_stride, cu_seqlens) -> list[int]:
    """First compressed row of every sequence (0 per batch row without cu_seqlens)."""
    if cu_seqlens is None:
        return [0] * len(seqs)
    out, acc = [], 0
    for _, _, n in seqs:
        out.append(acc)
        acc += nsa_num_windows(n, kernel_size, kernel_stride)
    return out


def _default_scale(scale: float | None, q: Tensor) -> float:
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def _attend(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of the G rows q ``[G, D]`` over k ``[S, D]``, v ``[S, Dv]``.

    S = 0 gives o = 0 and lse = −inf (and a zero gradient)."""
    if k.shape[0] == 0:
        o = q.new_zeros(q.shape[0], v.shape[1]) + 0 * q.sum()
        return o, q.new_full((q.shape[0],), -math.inf)
    s = (q @ k.T) * scale
    lse = torch.logsumexp(s, dim=-1)
    return torch.softmax(s, dim=-1) @ v, lse


# ----------------------------------------------------------------------------- compression


def nsa_compress_reference(
    x: Tensor,
    *,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    weight: Tensor | None = None,
    pe: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Window i covers tokens [i·d, i·d + l). ``weight`` None: mean of the window; else
    ``concat_r(x_{i·d+r} + pe_r) · W`` with W ``[H, l·D, D_out]`` and pe ``[H, l, D]``.

    Returns (x_cmp ``[B, C, H, D_out]``, compressed cu_seqlens or None)."""
    B, T, H, D = x.shape
    seqs = _seqs(B, T, cu_seqlens)
    ks, d = kernel_size, kernel_stride
    d_out = D if weight is None else weight.shape[2]
    outs = []
    for b, s, n in seqs:
        rows = []
        for i in range(nsa_num_windows(n, ks, d)):
            win = x[b, s + i * d : s + i * d + ks]  # [l, H, D]
            if weight is None:
                rows.append(win.mean(dim=0))
            else:
                if pe is not None:
                    win = win + pe.transpose(0, 1)
                flat = win.transpose(0, 1).reshape(H, ks * D)
                rows.append(torch.einsum("hi,hio->ho", flat, weight))
        outs.append(torch.stack(rows) if rows else x.new_zeros(0, H, d_out))
    if cu_seqlens is None:
        c = nsa_num_windows(T, ks, d)
        out = torch.stack(outs) if B > 0 else x.new_zeros(0, c, H, d_out)
        return out, None
    counts = [o.shape[0] for o in outs]
    cu_cmp = torch.tensor([0] + counts, dtype=cu_seqlens.dtype, device=x.device).cumsum(0)
    return torch.cat(outs)[None], cu_cmp.to(cu_seqlens.dtype)


# ----------------------------------------------------------------------------- attention branches


def _per_token_attn(q, k, v, scale, cu_seqlens, key_rows, k_offsets=None):
    """Shared loop: key_rows(seq_index, t, g) -> 1-D LongTensor of key positions (local to the
    sequence's keys, which start at k_offsets[seq] or the sequence start)."""
    B, T, Hq, D = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    seqs = _seqs(B, T, cu_seqlens)
    o_rows = [[None] * T for _ in range(B)]
    lse_rows = [[None] * T for _ in range(B)]
    for si, (b, s, n) in enumerate(seqs):
        kb = s if k_offsets is None else k_offsets[si]
        for t in range(n):
            os_, ls_ = [], []
            for g in range(Hkv):
                idx = key_rows(si, t, g)
                kk = k[b, kb + idx, g] if idx.numel() else k.new_zeros(0, D)
                vv = v[b, kb + idx, g] if idx.numel() else v.new_zeros(0, Dv)
                o, lse = _attend(q[b, s + t, g * G : (g + 1) * G], kk, vv, scale)
                os_.append(o)
                ls_.append(lse)
            o_rows[b][s + t] = torch.cat(os_)
            lse_rows[b][s + t] = torch.cat(ls_)
    o = torch.stack([torch.stack(r) for r in o_rows]) if T * B > 0 else q.new_zeros(B, T, Hq, Dv)
    lse = torch.stack([torch.stack(r) for r in lse_rows]) if T * B > 0 else q.new_zeros(B, T, Hq)
    return o, lse


def nsa_compressed_attn_reference(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    *,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of q_t over the compressed windows i with t ≥ i·d + l − 1 -> (o, lse)."""
    scale = _default_scale(scale, q)
    seqs = _seqs(q.shape[0], q.shape[1], cu_seqlens)
    offs = _cmp_offsets(seqs, kernel_size, kernel_stride, cu_seqlens)
    C = k_cmp.shape[1]

    def rows(si, t, g):
        avail = (
            C if cu_seqlens is None else nsa_num_windows(seqs[si][2], kernel_size, kernel_stride)
        )
        return torch.arange(
            min(_num_visible(t, kernel_size, kernel_stride), avail), device=q.device
        )

    return _per_token_attn(q, k_cmp, v_cmp, scale, cu_seqlens, rows, offs)


def _selected_rows(block_indices, block_size, block_counts, seqs, device):
    n_top = block_indices.shape[-1]

    def rows(si, t, g):
        b, s, n = seqs[si]
        count = n_top
        if block_counts is not None:
            count = (
                int(block_counts)
                if isinstance(block_counts, int)
                else int(block_counts[b, s + t, g])
            )
            count = max(0, min(count, n_top))
        out = []
        for j in block_indices[b, s + t, g, :count].tolist():
            if 0 <= j <= t // block_size:
                out.extend(range(j * block_size, min((j + 1) * block_size, n, t + 1)))
        return torch.tensor(sorted(out), dtype=torch.long, device=device)

    return rows


def nsa_selected_attn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    *,
    block_size: int = 64,
    block_counts: Tensor | int | None = None,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    return_lse: bool = False,
):
    """Attention of q_t over the union of the selected blocks j (0 ≤ j ≤ t//B_K), positions ≤ t.

    Entries −1 or > t//B_K are skipped; only the first ``block_counts`` entries of a row are used.
    """
    scale = _default_scale(scale, q)
    seqs = _seqs(q.shape[0], q.shape[1], cu_seqlens)
    rows = _selected_rows(block_indices, block_size, block_counts, seqs, q.device)
    o, lse = _per_token_attn(q, k, v, scale, cu_seqlens, rows)
    return (o, lse) if return_lse else o


def sliding_window_attn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int = 512,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    return_lse: bool = False,
):
    """Causal attention of q_t over keys max(0, t − W + 1) … t (W keys, fla's convention)."""
    scale = _default_scale(scale, q)

    def rows(si, t, g):
        return torch.arange(max(0, t - window_size + 1), t + 1, device=q.device)

    o, lse = _per_token_attn(q, k, v, scale, cu_seqlens, rows)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- selection


def nsa_topk_blocks_reference(
    q: Tensor,
    k_cmp: Tensor,
    lse: Tensor,
    *,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    block_size: int = 64,
    topk: int = 16,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Block selection (docs/api/nsa.md, "Math") -> block_indices ``[B, T, Hkv, topk]`` int32,
    −1 padded."""
    ks, d, bk = kernel_size, kernel_stride, block_size
    if ks % d or bk % d:
        raise ValueError("kernel_size and block_size must be multiples of kernel_stride")
    a, bb = ks // d, bk // d
    scale = _default_scale(scale, q)
    B, T, Hq, _ = q.shape
    Hkv = k_cmp.shape[2]
    G = Hq // Hkv
    seqs = _seqs(B, T, cu_seqlens)
    offs = _cmp_offsets(seqs, ks, d, cu_seqlens)
    C = k_cmp.shape[1]
    out = torch.full((B, T, Hkv, topk), -1, dtype=torch.int32)
    with torch.no_grad():
        for si, (b, s, n) in enumerate(seqs):
            avail = C if cu_seqlens is None else nsa_num_windows(n, ks, d)
            for t in range(n):
                nvis = min(_num_visible(t, ks, d), avail)
                kc = k_cmp[b, offs[si] : offs[si] + nvis].double()  # [nvis, Hkv, D]
                qt = q[b, s + t].double()  # [Hq, D]
                nb = t // bk + 1
                for g in range(Hkv):
                    hs = slice(g * G, (g + 1) * G)
                    s_ = qt[hs] @ kc[:, g].T * scale  # [G, nvis]
                    p = torch.exp(s_ - lse[b, s + t, hs].double()[:, None]).sum(0).tolist()
                    scores = []
                    for j in range(nb):
                        acc = 0.0
                        for x in range(a):
                            for y in range(bb):
                                i = bb * j + y - x
                                if 0 <= i < nvis:
                                    acc += p[i]
                        forced = j < init_blocks or t // bk - local_blocks < j
                        scores.append(math.inf if forced else acc)
                    order = sorted(range(nb), key=lambda j, sc=scores: (-sc[j], j))[:topk]
                    sel = sorted(order)
                    out[b, s + t, g, : len(sel)] = torch.tensor(sel, dtype=torch.int32)
    return out.to(q.device)


# ----------------------------------------------------------------------------- combined


def nsa_attn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_swa: Tensor,
    *,
    k_cmp: Tensor,
    v_cmp: Tensor,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    block_size: int = 64,
    topk: int = 16,
    window_size: int = 512,
    init_blocks: int = 1,
    local_blocks: int = 2,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    block_indices: Tensor | None = None,
) -> Tensor:
    """o = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa per query head."""
    o_cmp, lse = nsa_compressed_attn_reference(
        q,
        k_cmp,
        v_cmp,
        kernel_size=kernel_size,
        kernel_stride=kernel_stride,
        scale=scale,
        cu_seqlens=cu_seqlens,
    )
    if block_indices is None:
        block_indices = nsa_topk_blocks_reference(
            q,
            k_cmp,
            lse,
            kernel_size=kernel_size,
            kernel_stride=kernel_stride,
            block_size=block_size,
            topk=topk,
            init_blocks=init_blocks,
            local_blocks=local_blocks,
            scale=scale,
            cu_seqlens=cu_seqlens,
        )
    o_slc = nsa_selected_attn_reference(
        q, k, v, block_indices, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens
    )
    o_swa = sliding_window_attn_reference(
        q, k, v, window_size=window_size, scale=scale, cu_seqlens=cu_seqlens
    )
    return (g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_swa[..., None] * o_swa).to(
        q.dtype
    )


# ----------------------------------------------------------------------------- dense formulation


def nsa_dense_masked_attn(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Dense softmax with a boolean mask ``[B, Hkv, T, S]`` (True = attend); empty rows give
    o = 0 and lse = −inf. The independent formulation the per-token references are tested
    against."""
    scale = _default_scale(scale, q)
    G = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(G, dim=2)
    vv = v.repeat_interleave(G, dim=2)
    m = mask.repeat_interleave(G, dim=1)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    s = s.masked_fill(~m, -math.inf)
    any_ = m.any(-1, keepdim=True)
    zero = s.new_zeros((*s.shape[:-1], 1))
    mx = torch.where(any_, s.amax(-1, keepdim=True) if s.shape[-1] else zero, zero).detach()
    e = torch.exp(s - mx)
    den = e.sum(-1, keepdim=True)
    den_safe = torch.where(any_, den, torch.ones_like(den))
    o = torch.einsum("bhts,bshd->bthd", e / den_safe, vv)
    lse = torch.where(any_, mx + torch.log(den_safe), torch.full_like(den, -math.inf))
    return o, lse[..., 0].transpose(1, 2)


def nsa_selection_mask(
    block_indices: Tensor, block_size: int, T: int, block_counts: Tensor | int | None = None
) -> Tensor:
    """[B, Hkv, T, T] mask of selected attention for one sequence per batch row."""
    B, _, Hkv, n = block_indices.shape
    t = torch.arange(T, device=block_indices.device)
    idx = block_indices.long()
    if block_counts is not None:
        cnt = (
            torch.full((B, T, Hkv), int(block_counts), device=idx.device)
            if isinstance(block_counts, int)
            else block_counts.long()
        )
        idx = torch.where(torch.arange(n, device=idx.device) < cnt[..., None], idx, -1)
    valid = (idx >= 0) & (idx <= (t // block_size)[None, :, None, None])
    key_block = t // block_size  # [S]
    hit = (idx[..., None] == key_block) & valid[..., None]  # [B, T, Hkv, n, S]
    mask = hit.any(3) & (t[None, None, None, :] <= t[None, :, None, None])
    return mask.permute(0, 2, 1, 3)


def sliding_window_mask(T: int, window_size: int, device=None) -> Tensor:
    t = torch.arange(T, device=device)
    return (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window_size)


def compressed_visibility_mask(
    T: int, C: int, kernel_size: int, kernel_stride: int, device=None
) -> Tensor:
    """[T, C]: window i visible to t iff t ≥ i·d + l − 1."""
    t = torch.arange(T, device=device)
    i = torch.arange(C, device=device)
    return t[:, None] >= i[None, :] * kernel_stride + kernel_size - 1
