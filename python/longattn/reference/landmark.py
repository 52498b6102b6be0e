"""Dense float64-capable references for landmark attention (docs/api/landmark.md).

Everything here builds the full [T, T] weight matrix: tests and small inputs only.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "landmark_attn_reference",
    "landmark_topk_blocks_reference",
    "landmark_weights_reference",
]


def _segments(q: Tensor, k: Tensor, cu_seqlens: Tensor | None):
    """(batch row, q slice, k slice) per sequence."""
    if cu_seqlens is None:
        for b in range(q.shape[0]):
            yield b, slice(0, q.shape[1]), slice(0, k.shape[1])
    else:
        cu = [int(x) for x in cu_seqlens.tolist()]
        for s, e in zip(cu[:-1], cu[1:], strict=True):
            yield 0, slice(s, e), slice(s, e)


def _selected(idx: Tensor, n_blocks: int) -> Tensor:
    """[Lq, Hkv, n] listed blocks -> [Lq, Hkv, n_blocks] bool (−1 and out of range ignored)."""
    ar = torch.arange(n_blocks, device=idx.device)
    return (idx.long()[..., None] == ar).any(dim=-2)


def _one_sequence(q, k, block_size, scale, idx):
    """Weights [Hq, Lq, Lk] of one sequence (q [Lq, Hq, D], k [Lk, Hkv, D])."""
    lq, hq, _ = q.shape
    lk, hkv, _ = k.shape
    g = hq // hkv
    bs = block_size
    kk = k.repeat_interleave(g, dim=1)
    s = torch.einsum("ihd,phd->hip", q, kk) * scale  # [H, Lq, Lk]
    qpos = torch.arange(lq, device=q.device) + (lk - lq)
    kpos = torch.arange(lk, device=q.device)
    qb, kb = qpos // bs, kpos // bs
    is_lm = kpos % bs == bs - 1
    nb = (lk + bs - 1) // bs
    neg = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)

    current = (kb[None, :] == qb[:, None]) & (kpos[None, :] <= qpos[:, None]) & ~is_lm[None, :]
    full = torch.arange(nb, device=q.device) * bs + bs - 1 < lk  # block has its landmark
    earlier = (torch.arange(nb, device=q.device)[None, :] < qb[:, None]) & full[None, :]
    earlier = earlier[None].expand(hq, lq, nb)
    if idx is not None:
        sel = _selected(idx, nb)  # [Lq, Hkv, nb]
        sel = sel.repeat_interleave(g, dim=1).permute(1, 0, 2)  # [Hq, Lq, nb]
        earlier = earlier & sel

    # pad to whole blocks: [H, Lq, nb, bs]
    pad = nb * bs - lk
    sp = torch.nn.functional.pad(s, (0, pad), value=float("-inf")).view(hq, lq, nb, bs)
    gate = sp[..., bs - 1]  # landmark logits
    ordinary = sp[..., : bs - 1]
    inner = torch.logsumexp(ordinary, dim=-1)  # [H, Lq, nb]
    inner = torch.where(torch.isfinite(inner), inner, torch.zeros_like(inner))

    gate_logits = torch.where(earlier, gate, neg)
    cur_logits = torch.where(current[None], s, neg)
    lse = torch.logsumexp(torch.cat([gate_logits, cur_logits], dim=-1), dim=-1)  # [H, Lq]

    w_cur = torch.where(current[None], torch.exp(cur_logits - lse[..., None]), 0.0)
    # earlier blocks: exp(gate − lse) · exp(s − inner) on ordinary tokens
    eff = gate_logits[..., None] - lse[..., None, None] + ordinary - inner[..., None]
    eff = torch.where(earlier[..., None], eff, neg)
    eff = torch.cat([eff, neg.expand(hq, lq, nb, 1)], dim=-1)  # landmarks: weight 0
    w_early = torch.exp(eff).reshape(hq, lq, nb * bs)[..., :lk]
    return w_cur + w_early, lse


def landmark_weights_reference(
    q: Tensor,
    k: Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    block_indices: Tensor | None = None,
) -> list[Tensor]:
    """The dense weights w [Hq, Lq, Lk] per sequence (in the inputs' dtype)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out = []
    for b, qs, ks in _segments(q, k, cu_seqlens):
        idx = None if block_indices is None else block_indices[b, qs]
        w, _ = _one_sequence(q[b, qs], k[b, ks], block_size, scale, idx)
        out.append(w)
    return out


def landmark_attn_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_size: int = 64,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    block_indices: Tensor | None = None,
    return_lse: bool = False,
):
    """o [B, Tq, Hq, E] (and lse [B, Tq, Hq]) by the dense grouped softmax of the docs.

    Differentiable in q, k, v (use float64 inputs for an oracle).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    hq, hkv = q.shape[2], k.shape[2]
    g = hq // hkv
    out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse_all = torch.zeros(q.shape[:3], dtype=q.dtype, device=q.device)
    outs, lses = [], []
    for b, qs, ks in _segments(q, k, cu_seqlens):
        idx = None if block_indices is None else block_indices[b, qs]
        w, lse = _one_sequence(q[b, qs], k[b, ks], block_size, scale, idx)
        vv = v[b, ks].repeat_interleave(g, dim=1)  # [Lk, Hq, E]
        outs.append((b, qs, torch.einsum("hip,phe->ihe", w, vv)))
        lses.append((b, qs, lse.transpose(0, 1)))
    # assemble without in-place writes on tensors that need grad
    rows = []
    for b in range(q.shape[0]):
        parts = [o for (bb, _, o) in outs if bb == b]
        rows.append(torch.cat(parts, dim=0) if parts else out[b])
    out = torch.stack(rows) if rows else out  # B == 0
    if return_lse:
        rows = []
        for b in range(q.shape[0]):
            parts = [x for (bb, _, x) in lses if bb == b]
            rows.append(torch.cat(parts, dim=0) if parts else lse_all[b])
        return out, (torch.stack(rows) if rows else lse_all)
    return out


def landmark_topk_blocks_reference(
    q: Tensor,
    k: Tensor,
    *,
    block_size: int = 64,
    topk: int,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """[B, Tq, Hkv, topk] int32: earlier full blocks ranked by their landmark logit (max over the
    kv group's query heads), the best topk sorted ascending, −1 padded. Ties keep lower blocks."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    bsz, tq, hq, _ = q.shape
    hkv = k.shape[2]
    g = hq // hkv
    bs = block_size
    out = torch.full((bsz, tq, hkv, topk), -1, dtype=torch.int32, device=q.device)
    for b, qs, ks in _segments(q, k, cu_seqlens):
        qq, kk = q[b, qs].double(), k[b, ks].double()
        lq, lk = qq.shape[0], kk.shape[0]
        nb = lk // bs  # full blocks
        if nb == 0 or lq == 0:
            continue
        lm = kk[bs - 1 :: bs][:nb]  # [nb, Hkv, D]
        s = torch.einsum("ihd,jhd->hij", qq, lm.repeat_interleave(g, dim=1)) * scale
        s = s.view(hkv, g, lq, nb).amax(dim=1)  # [Hkv, Lq, nb]
        qb = (torch.arange(lq) + (lk - lq)) // bs
        visible = torch.arange(nb)[None, :] < qb[:, None]
        s = torch.where(visible[None], s, float("-inf"))
        for i in range(lq):
            for h in range(hkv):
                cand = [(-s[h, i, j].item(), j) for j in range(int(min(qb[i], nb)))]
                cand.sort()
                sel = sorted(j for _, j in cand[:topk])
                out[b, qs.start + i, h, : len(sel)] = torch.tensor(sel, dtype=torch.int32)
    return out
