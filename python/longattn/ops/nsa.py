"""Native Sparse Attention ops: compression, compressed attention, block
selection, selected attention, sliding window, and the gated combination.

Math and conventions: ``docs/api/nsa.md``. The three attention branches share one native
kernel pair (``_native.nsa_branch_fwd/bwd``) parametrised by the key set of every query; on
CUDA they run the tensor-core kernels of ``cuda/nsa.cu``, and compression and block selection
run ``cuda/nsa_select.cu``. The CUDA scratch (float32 partials, Δ, the per-block query lists of
selected attention) is allocated here, and everything derived from ``cu_seqlens`` or the block
indices is computed with device tensor ops (no host synchronisation, except sizing the output of
``nsa_compress`` with ``cu_seqlens``). Memory saved for a branch's backward: q, k, v, out,
lse and, for float16/bfloat16 when a backward will follow, out's rounding residual ``out_lo``
(one more out-sized tensor, see ``_branch``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _native
from .._deprecation import warn
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
    "nsa_attn",
    "nsa_compress",
    "nsa_compressed_attn",
    "nsa_selected_attn",
    "nsa_topk_blocks",
    "sliding_window_attn",
]


def _num_windows(length: int, kernel_size: int, kernel_stride: int) -> int:
    return (length - kernel_size) // kernel_stride + 1 if length >= kernel_size else 0


def _scale(scale: float | None, q: Tensor) -> float:
    return float(q.shape[-1] ** -0.5 if scale is None else scale)


def _check_int(name: str, val) -> None:
    # no silent int() coercion: "4" or 2.5 would otherwise pass (or truncate) unnoticed
    if isinstance(val, bool) or not isinstance(val, int):
        raise TypeError(f"{name}: expected an int, got {type(val).__name__}")


def _check_positive(**kw: int) -> None:
    for name, val in kw.items():
        _check_int(name, val)
        if val < 1:
            raise ValueError(f"{name}: must be at least 1, got {val}")


# ----------------------------------------------------------------------------- CUDA plans

# Selected attention forward on CUDA: groups of at most this many query heads run KV-outer (FSA:
# one CTA per chunk of the queries that selected a block, float32 partials combined afterwards);
# larger groups run query-outer (one CTA per token and kv group, looping over its blocks).
# H200, bf16, T=8K/32K: KV-outer 1.8/6.8 ms at G=4 and growing about linearly with G; query-outer
# 6.2/25.6 ms at both G=8 and G=16, so the crossover sits between 8 and 16 (measured with the
# earlier one-warp query-outer kernel; the 4-warp split-key one may move it down).
KV_OUTER_MAX_GROUP = 8
# Query-list chunk per CTA: forward (about 256 query rows) and dK/dV (long lists are split and
# their float32 partials reduced in order).
_FWD_CHUNK_ROWS = 256
_BWD_CHUNK_TOKENS = 4096


def _cmp_offsets(cu_seqlens: Tensor, total: int, kernel_size: int, kernel_stride: int) -> Tensor:
    """First compressed row of every sequence ([N + 1] int64), on the device."""
    cu = cu_seqlens.long().clamp(0, total)
    lens = (cu[1:] - cu[:-1]).clamp_min(0)
    win = torch.where(
        lens >= kernel_size,
        torch.div(lens - kernel_size, kernel_stride, rounding_mode="floor") + 1,
        0,
    )
    return torch.cat([win.new_zeros(1), win.cumsum(0)])


def _block_lists(
    block_indices: Tensor,
    block_counts: Tensor | None,
    count: int,
    block_size: int,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Per (block, kv head) lists of the queries that selected it, built on the device.

    Returns ``entries`` (int32 entry ids ``((b·T + t)·Hkv + g)·n + slot`` sorted by list, token
    order inside a list: stable) and ``list_off`` (``[NL + 1]`` int32 list starts). Invalid
    entries (−1, future blocks, beyond the count) sort past the last list.
    """
    B, T, Hkv, n = block_indices.shape
    dev = block_indices.device
    t = torch.arange(T, device=dev)
    nb = (T + block_size - 1) // block_size
    if cu_seqlens is None:
        tloc = t[None, :].expand(B, T)
        base = (torch.arange(B, device=dev) * nb)[:, None].expand(B, T)
        nblocks = B * nb
    else:
        cu = cu_seqlens.long().clamp(0, T)
        nseq = cu.shape[0] - 1
        seq = (torch.searchsorted(cu, t, right=True) - 1).clamp(0, nseq - 1)
        tloc = (t - cu[seq])[None, :]
        lens = (cu[1:] - cu[:-1]).clamp_min(0)
        nbs = (lens + block_size - 1) // block_size
        off = torch.cat([nbs.new_zeros(1), nbs.cumsum(0)])
        base = off[seq][None, :]
        nblocks = B * nb + nseq
    j = block_indices.long()
    valid = (j >= 0) & (j <= torch.div(tloc, block_size, rounding_mode="floor")[..., None, None])
    slots = torch.arange(n, device=dev)
    if block_counts is not None:
        valid &= slots < block_counts.long()[..., None]
    elif count >= 0:
        valid &= slots < count
    nl = nblocks * Hkv
    key = (base[..., None, None] + j) * Hkv + torch.arange(Hkv, device=dev)[:, None]
    key = torch.where(valid, key, nl).flatten()
    sorted_key, order = torch.sort(key, stable=True)
    list_off = torch.searchsorted(sorted_key, torch.arange(nl + 1, device=dev))
    return order.to(torch.int32), list_off.to(torch.int32)


def _chunk_offsets(list_off: Tensor, chunk_tokens: int) -> tuple[Tensor, Tensor]:
    """Chunk starts per list ([NL + 1] int32) and the scratch slot starts of split lists."""
    lens = (list_off[1:] - list_off[:-1]).long()
    chunks = (lens + chunk_tokens - 1) // chunk_tokens
    zero = chunks.new_zeros(1)
    chunk_off = torch.cat([zero, chunks.cumsum(0)]).to(torch.int32)
    split = torch.where(chunks > 1, chunks, 0)
    split_off = torch.cat([zero, split.cumsum(0)]).to(torch.int32)
    return chunk_off, split_off


def _kv_outer(q: Tensor, k: Tensor, block_size: int) -> bool:
    return q.shape[2] // max(1, k.shape[2]) <= KV_OUTER_MAX_GROUP and block_size <= 128


# ----------------------------------------------------------------------------- attention branches


def _nsa_branch_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor | None,
    block_counts: Tensor | None,
    kind: str,
    count: int,
    a: int,
    b: int,
    scale: float,
    cu_seqlens: Tensor | None,
    residual: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(out, lse, out_lo)``. With ``residual``, out_lo (like out) holds the rounding
    residual of out, which the backward adds to out in Δ = rowsum(dO ∘ O); else it is empty
    (custom ops cannot return None)."""
    out = torch.empty((*q.shape[:3], v.shape[3]), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=state_dtype(q.dtype), device=q.device)
    out_lo = torch.empty(out.shape if residual else (0,), dtype=q.dtype, device=q.device)
    aux = _cuda_fwd_aux(q, k, v, block_indices, block_counts, kind, count, a, b, cu_seqlens)
    with native_call(q) as stream:
        _native.nsa_branch_fwd(
            kind,
            q.detach(),
            k.detach(),
            v.detach(),
            out,
            out_lo if residual else None,
            lse,
            block_indices,
            block_counts,
            count,
            a,
            b,
            scale,
            cu_seqlens,
            stream,
            **aux,
        )
    return out, lse, out_lo


def _cuda_fwd_aux(q, k, v, block_indices, block_counts, kind, count, a, b, cu_seqlens) -> dict:
    if q.device.type != "cuda":
        return {}
    aux = {}
    if kind == "compressed" and cu_seqlens is not None:
        aux["cmp_off"] = _cmp_offsets(cu_seqlens, q.shape[1], a, b)
    if kind == "selected" and block_indices is not None and block_indices.dim() == 4:
        if _kv_outer(q, k, a) and q.numel() > 0:
            B, T, Hq = q.shape[:3]
            n = block_indices.shape[3]
            G = Hq // max(1, k.shape[2])
            ct = max(1, _FWD_CHUNK_ROWS // max(1, G))
            entries, list_off = _block_lists(block_indices, block_counts, count, a, cu_seqlens)
            chunk_off, _ = _chunk_offsets(list_off, ct)
            aux.update(
                entries=entries,
                list_off=list_off,
                chunk_off=chunk_off,
                chunk_tokens=ct,
                part_o=torch.empty((B, T, Hq, n, v.shape[3]), dtype=torch.float32, device=q.device),
                part_lse=torch.empty((B, T, Hq, n), dtype=torch.float32, device=q.device),
            )
    return aux


def _cuda_bwd_aux(q, k, v, block_indices, block_counts, kind, count, a, b, cu_seqlens) -> dict:
    if q.device.type != "cuda":
        return {}
    aux = {"delta": torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)}
    if kind in ("window", "compressed") and torch.cuda.get_device_capability(q.device)[0] == 9:
        # the Hopper backward's row table: lse, Δ and key range per (head, token)
        B, T, Hq = q.shape[:3]
        tp = (T + 63) // 64 * 64
        aux["rowinfo"] = torch.empty((B * Hq, 4, tp), dtype=torch.float32, device=q.device)
    if kind == "compressed" and cu_seqlens is not None:
        aux["cmp_off"] = _cmp_offsets(cu_seqlens, q.shape[1], a, b)
    if kind == "selected" and block_indices is not None and block_indices.dim() == 4:
        B, T, Hkv, n = block_indices.shape
        ct = _BWD_CHUNK_TOKENS
        entries, list_off = _block_lists(block_indices, block_counts, count, a, cu_seqlens)
        chunk_off, split_off = _chunk_offsets(list_off, ct)
        # split lists: at most 2·(entries / chunk) chunk slots of [key tiles, 64, D + Dv]
        slots = 2 * (B * T * Hkv * n) // ct + 1
        tiles = (a + 63) // 64
        scratch = torch.empty(
            (slots, tiles, 64, q.shape[3] + v.shape[3]), dtype=torch.float32, device=q.device
        )
        aux.update(
            entries=entries,
            list_off=list_off,
            chunk_off=chunk_off,
            split_off=split_off,
            scratch=scratch,
            chunk_tokens=ct,
        )
        if _kv_outer(q, k, a) and q.numel() > 0:
            # dQ from the KV-outer dK/dV kernel: float32 partials per (row, slot, key tile), the
            # same order of memory as the forward's part_o
            aux["part_dq"] = torch.empty(
                (B, T, q.shape[2], n, tiles, q.shape[3]), dtype=torch.float32, device=q.device
            )
    return aux


# eager calls that need no dispatcher run _nsa_branch_fwd directly (direct_call)
nsa_branch_fwd = torch.library.custom_op(
    "longattn::nsa_branch_fwd", _nsa_branch_fwd, mutates_args=(), device_types=("cpu", "cuda")
)


@nsa_branch_fwd.register_fake
def _(q, k, v, block_indices, block_counts, kind, count, a, b, scale, cu_seqlens, residual):
    out = q.new_empty((*q.shape[:3], v.shape[3]))
    lse = q.new_empty(q.shape[:3], dtype=state_dtype(q.dtype))
    return out, lse, q.new_empty(out.shape if residual else (0,))


@torch.library.custom_op("longattn::nsa_branch_bwd", mutates_args=(), device_types=("cpu", "cuda"))
def nsa_branch_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    out_lo: Tensor | None,
    lse: Tensor,
    grad_out: Tensor,
    block_indices: Tensor | None,
    block_counts: Tensor | None,
    kind: str,
    count: int,
    a: int,
    b: int,
    scale: float,
    cu_seqlens: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # selected attention on CUDA writes dk/dv only for the keys of selected blocks
    zero_kv = q.device.type == "cuda" and kind == "selected"
    dk = (torch.zeros if zero_kv else torch.empty)(k.shape, dtype=q.dtype, device=q.device)
    dv = (torch.zeros if zero_kv else torch.empty)(v.shape, dtype=q.dtype, device=q.device)
    grad_out = unit_last_stride(grad_out.to(q.dtype))
    aux = _cuda_bwd_aux(q, k, v, block_indices, block_counts, kind, count, a, b, cu_seqlens)
    with native_call(q) as stream:
        _native.nsa_branch_bwd(
            kind,
            q.detach(),
            k.detach(),
            v.detach(),
            out.detach(),
            None if out_lo is None else out_lo.detach(),
            lse.detach(),
            grad_out.detach(),
            dq,
            dk,
            dv,
            block_indices,
            block_counts,
            count,
            a,
            b,
            scale,
            cu_seqlens,
            stream,
            **aux,
        )
    return dq, dk, dv


@nsa_branch_bwd.register_fake
def _(q, k, v, out, out_lo, lse, grad_out, block_indices, block_counts, kind, count, a, b, scale,
      cu):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _branch_setup(ctx, inputs, output):
    q, k, v, block_indices, block_counts, kind, count, a, b, scale, cu_seqlens, residual = inputs
    out, lse, out_lo = output
    ctx.params = (kind, count, a, b, scale, residual)
    ctx.mark_non_differentiable(lse, out_lo)
    ctx.save_for_backward(q, k, v, out, out_lo, lse, block_indices, block_counts, cu_seqlens)


def _branch_backward(ctx, grad_out, _grad_lse, _grad_out_lo):
    q, k, v, out, out_lo, lse, block_indices, block_counts, cu_seqlens = ctx.saved_tensors
    kind, count, a, b, scale, residual = ctx.params
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = nsa_branch_bwd(
        q, k, v, out, out_lo if residual else None, lse, grad_out, block_indices, block_counts,
        kind, count, a, b, scale, cu_seqlens,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


def _branch(q, k, v, block_indices, block_counts, kind, count, a, b, scale, cu_seqlens):
    """``(o, lse)`` of one branch. 16-bit forwards that a backward will follow also store o's
    rounding residual (one more o-sized tensor saved): where attention is nearly one-hot,
    dP − Δ is tiny and Δ = rowsum(dO ∘ o) from the rounded o alone would be wrong by far more."""
    residual = wants_out_lo(q, k, v)
    direct = direct_call(q, k, v, block_indices, block_counts, cu_seqlens)
    o, lse, _ = (_nsa_branch_fwd if direct else nsa_branch_fwd)(
        q, k, v, block_indices, block_counts, kind, count, a, b, scale, cu_seqlens, residual
    )
    return o, lse


nsa_branch_fwd.register_autograd(_branch_backward, setup_context=_branch_setup)


def _check_qkv(q, k, v, kname="k", vname="v"):
    check_rank(q, "q", 4, "[B, T, Hq, D]")
    check_rank(k, kname, 4, "[B, S, Hkv, D]")
    check_rank(v, vname, 4, "[B, S, Hkv, Dv]")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(
            f"{kname}, {vname}: expected dtype {q.dtype} like q, got {k.dtype}, {v.dtype}"
        )
    for t, name in ((k, kname), (v, vname)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} like q, got {t.device}")
    return unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)


def nsa_compressed_attn(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    *,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    return_lse: bool | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of q_t over the compressed windows i it can see (t ≥ i·d + l − 1).

    Args:
        q: ``[B, T, Hq, D]``; k_cmp, v_cmp: ``[B, C, Hkv, D]`` (packed per sequence with
            cu_seqlens, B = 1; C = Σ ⌊(T_s − l)/d⌋ + 1 over sequences with T_s ≥ l).
        scale: default ``D ** -0.5``.
        return_lse: also return the log-sum-exp (the input of :func:`nsa_topk_blocks`). Not
            passing it returns ``(o, lse)`` as before with a DeprecationWarning: the default
            becomes False (o only), like every other softmax op, in the next release.

    Returns:
        o ``[B, T, Hq, Dv]``, or ``(o, lse)`` with ``return_lse=True``: lse ``[B, T, Hq]``
        float32 (float64 for float64), −inf (and o = 0) for rows that see no window. lse
        carries no gradient.
    """
    if return_lse is None:
        warn(
            "nsa_compressed_attn will return only o by default in the next release; pass "
            "return_lse=True to keep (o, lse) (or return_lse=False for o alone)"
        )
        return_lse = True
    q, k_cmp, v_cmp = _check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    check_cu_seqlens(cu_seqlens)
    _check_positive(kernel_size=kernel_size, kernel_stride=kernel_stride)
    o, lse = _branch(
        q, k_cmp, v_cmp, None, None, "compressed", -1, int(kernel_size), int(kernel_stride),
        _scale(scale, q), cu_seqlens,
    )  # fmt: skip
    return (o, lse) if return_lse else o


def nsa_selected_attn(
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
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of q_t over the union of its kv group's selected blocks.

    Block j covers positions ``[j·B_K, (j+1)·B_K)`` of the sequence, of which those ≤ t are
    used; entries −1, negative or > t // B_K are skipped. Entries of a row must be distinct.

    Args:
        q: ``[B, T, Hq, D]``; k, v: ``[B, T, Hkv, D]``; block_indices ``[B, T, Hkv, n]``
            int32/int64 (no gradient).
        block_counts: int or ``[B, T, Hkv]`` int tensor: only the first count entries of a
            row are used.
        return_lse: also return the log-sum-exp ``[B, T, Hq]`` (float32, float64 for float64).

    Returns:
        o ``[B, T, Hq, Dv]``, or ``(o, lse)`` with ``return_lse=True`` (lse: no gradient).
    """
    q, k, v = _check_qkv(q, k, v)
    check_rank(block_indices, "block_indices", 4, "[B, T, Hkv, n]")
    check_cu_seqlens(cu_seqlens)
    _check_positive(block_size=block_size)
    count, counts = -1, None
    if isinstance(block_counts, torch.Tensor):
        check_rank(block_counts, "block_counts", 3, "[B, T, Hkv]")
        counts = block_counts
    elif block_counts is not None:
        count = max(0, int(block_counts))
    o, lse = _branch(
        q, k, v, block_indices, counts, "selected", count, int(block_size), 0, _scale(scale, q),
        cu_seqlens,
    )  # fmt: skip
    return (o, lse) if return_lse else o


def sliding_window_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window_size: int = 512,
    scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Causal softmax attention of q_t over keys ``max(0, t − W + 1) … t``.

    W keys including t itself (fla's convention; some references use W + 1 keys).
    q ``[B, T, Hq, D]``, k/v ``[B, T, Hkv, D]``. Returns o ``[B, T, Hq, Dv]``, or ``(o, lse)``
    with ``return_lse=True`` (lse ``[B, T, Hq]`` float32, float64 for float64; no gradient).
    """
    q, k, v = _check_qkv(q, k, v)
    check_cu_seqlens(cu_seqlens)
    _check_positive(window_size=window_size)
    o, lse = _branch(
        q, k, v, None, None, "window", -1, int(window_size), 0, _scale(scale, q), cu_seqlens
    )
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------- selection


def _nsa_topk_blocks(
    q: Tensor,
    k_cmp: Tensor,
    lse: Tensor,
    kernel_size: int,
    kernel_stride: int,
    block_size: int,
    topk: int,
    init_blocks: int,
    local_blocks: int,
    scale: float,
    cu_seqlens: Tensor | None,
) -> Tensor:
    out = torch.empty((*q.shape[:2], k_cmp.shape[2], topk), dtype=torch.int32, device=q.device)
    with native_call(q) as stream:
        _native.nsa_topk_blocks(
            q.detach(), k_cmp.detach(), lse.detach(), out, kernel_size, kernel_stride,
            block_size, topk, init_blocks, local_blocks, scale, cu_seqlens, stream,
        )  # fmt: skip
    return out


# eager calls that need no dispatcher run _nsa_topk_blocks directly (direct_call)
nsa_topk_blocks_op = torch.library.custom_op(
    "longattn::nsa_topk_blocks", _nsa_topk_blocks, mutates_args=(), device_types=("cpu", "cuda")
)


@nsa_topk_blocks_op.register_fake
def _(q, k_cmp, lse, kernel_size, kernel_stride, block_size, topk, init, local, scale, cu):
    return q.new_empty((*q.shape[:2], k_cmp.shape[2], topk), dtype=torch.int32)


def nsa_topk_blocks(
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
    """Block selection (docs/api/nsa.md, "Math"), fused: no ``[T, C]`` score matrix is stored.

    Scores blocks by the group-summed compressed probabilities ``exp(scale·q·k̃ − lse)``
    mapped to blocks with overlap weights; the first ``init_blocks`` and the ``local_blocks``
    most recent blocks are forced; top ``topk`` (ties to the lower block), sorted ascending,
    −1 beyond the blocks that exist at t. Requires kernel_size % kernel_stride == 0 and
    block_size % kernel_stride == 0. Returns ``[B, T, Hkv, topk]`` int32 (no gradient).
    """
    check_rank(q, "q", 4, "[B, T, Hq, D]")
    check_rank(k_cmp, "k_cmp", 4, "[B, C, Hkv, D]")
    check_rank(lse, "lse", 3, "[B, T, Hq]")
    check_cu_seqlens(cu_seqlens)
    _check_positive(
        kernel_size=kernel_size, kernel_stride=kernel_stride, block_size=block_size, topk=topk
    )
    for name, val in (("init_blocks", init_blocks), ("local_blocks", local_blocks)):
        _check_int(name, val)
        if val < 0:
            raise ValueError(f"{name}: must be >= 0, got {val}")
    if lse.is_floating_point():
        lse = lse.to(state_dtype(q.dtype))
    q, k_cmp = unit_last_stride(q), unit_last_stride(k_cmp)
    with torch.no_grad():
        topk_op = _nsa_topk_blocks if direct_call(q, k_cmp, lse, cu_seqlens) else nsa_topk_blocks_op
        return topk_op(
            q, k_cmp, lse.detach(), int(kernel_size), int(kernel_stride), int(block_size),
            int(topk), int(init_blocks), int(local_blocks), _scale(scale, q), cu_seqlens,
        )  # fmt: skip


# ----------------------------------------------------------------------------- compression


def _nsa_compress_fwd(
    x: Tensor,
    weight: Tensor | None,
    pe: Tensor | None,
    kernel_size: int,
    kernel_stride: int,
    num_rows: int,
    cu_seqlens: Tensor | None,
    cu_seqlens_cmp: Tensor | None,
) -> Tensor:
    d_out = x.shape[3] if weight is None else weight.shape[2]
    out = torch.empty((x.shape[0], num_rows, x.shape[2], d_out), dtype=x.dtype, device=x.device)
    with native_call(x) as stream:
        _native.nsa_compress_fwd(
            x.detach(),
            None if weight is None else weight.detach(),
            None if pe is None else pe.detach(),
            out,
            kernel_size,
            kernel_stride,
            cu_seqlens,
            cu_seqlens_cmp,
            stream,
        )
    return out


# eager calls that need no dispatcher run _nsa_compress_fwd directly (direct_call)
nsa_compress_fwd = torch.library.custom_op(
    "longattn::nsa_compress_fwd", _nsa_compress_fwd, mutates_args=(), device_types=("cpu", "cuda")
)


@nsa_compress_fwd.register_fake
def _(x, weight, pe, kernel_size, kernel_stride, num_rows, cu_seqlens, cu_seqlens_cmp):
    d_out = x.shape[3] if weight is None else weight.shape[2]
    return x.new_empty((x.shape[0], num_rows, x.shape[2], d_out))


@torch.library.custom_op(
    "longattn::nsa_compress_bwd", mutates_args=(), device_types=("cpu", "cuda")
)
def nsa_compress_bwd(
    x: Tensor,
    weight: Tensor | None,
    pe: Tensor | None,
    grad_out: Tensor,
    kernel_size: int,
    kernel_stride: int,
    cu_seqlens: Tensor | None,
    cu_seqlens_cmp: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    # unused gradients come back as empty tensors (custom ops cannot return None)
    dw = torch.empty(weight.shape if weight is not None else (0,), dtype=x.dtype, device=x.device)
    dpe = torch.empty(pe.shape if pe is not None else (0,), dtype=x.dtype, device=x.device)
    grad_out = unit_last_stride(grad_out.to(x.dtype))
    # CUDA, linear: float32 scratch for grad_out · Wᵀ per window ([B, C, H, l·D], O(B·T·H·D))
    scratch = None
    if weight is not None and x.device.type == "cuda":
        scratch = torch.empty(
            (x.shape[0], grad_out.shape[1], x.shape[2], kernel_size * x.shape[3]),
            dtype=torch.float32,
            device=x.device,
        )
    with native_call(x) as stream:
        _native.nsa_compress_bwd(
            x.detach(),
            None if weight is None else weight.detach(),
            None if pe is None else pe.detach(),
            grad_out.detach(),
            dx,
            None if weight is None else dw,
            None if pe is None else dpe,
            kernel_size,
            kernel_stride,
            cu_seqlens,
            cu_seqlens_cmp,
            scratch,
            stream,
        )
    return dx, dw, dpe


@nsa_compress_bwd.register_fake
def _(x, weight, pe, grad_out, kernel_size, kernel_stride, cu_seqlens, cu_seqlens_cmp):
    dw = x.new_empty(weight.shape if weight is not None else (0,))
    dpe = x.new_empty(pe.shape if pe is not None else (0,))
    return torch.empty_like(x), dw, dpe


def _compress_setup(ctx, inputs, output):
    x, weight, pe, kernel_size, kernel_stride, num_rows, cu_seqlens, cu_seqlens_cmp = inputs
    ctx.params = (kernel_size, kernel_stride)
    ctx.save_for_backward(x, weight, pe, cu_seqlens, cu_seqlens_cmp)


def _compress_backward(ctx, grad_out):
    x, weight, pe, cu_seqlens, cu_seqlens_cmp = ctx.saved_tensors
    kernel_size, kernel_stride = ctx.params
    dx, dw, dpe = nsa_compress_bwd(
        x, weight, pe, grad_out, kernel_size, kernel_stride, cu_seqlens, cu_seqlens_cmp
    )
    return (
        dx,
        dw if weight is not None else None,
        dpe if pe is not None else None,
        None,
        None,
        None,
        None,
        None,
    )


nsa_compress_fwd.register_autograd(_compress_backward, setup_context=_compress_setup)


def _compressed_offsets(cu_seqlens: Tensor, kernel_size: int, kernel_stride: int) -> Tensor:
    """Compressed cu_seqlens, computed on cu_seqlens' device (no host synchronisation)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = torch.where(
        lengths >= kernel_size,
        torch.div(lengths - kernel_size, kernel_stride, rounding_mode="floor") + 1,
        torch.zeros_like(lengths),
    )
    cu_cmp = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return cu_cmp.to(cu_seqlens.dtype)


def nsa_compress(
    x: Tensor,
    *,
    kernel_size: int = 32,
    kernel_stride: int = 16,
    weight: Tensor | None = None,
    pe: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Compress windows ``[i·d, i·d + l)`` of every sequence (a trailing partial window is
    dropped): the mean when ``weight`` is None, else ``concat_r(x_{i·d+r} + pe_r) · W``.

    Args:
        x: ``[B, T, H, D]``.
        weight: ``[H, l·D, D_out]`` (linear compression); pe: ``[H, l, D]`` (linear only).
        cu_seqlens: packed sequences (B = 1); windows never cross a sequence start.

    Returns:
        ``(x_cmp, cu_seqlens_cmp)``: x_cmp ``[B, C, H, D_out]`` packed per sequence in order;
        cu_seqlens_cmp the compressed offsets (None without cu_seqlens).

    With cu_seqlens the number of output rows depends on the sequence lengths, so on CUDA this
    op reads one scalar (the total compressed row count) back to the host to size x_cmp; the
    compressed offsets themselves are computed on the device and the kernels read cu_seqlens
    on the device. Without cu_seqlens nothing is synchronised.
    """
    check_rank(x, "x", 4, "[B, T, H, D]")
    check_rank(weight, "weight", 3, "[H, kernel_size·D, D_out]")
    check_rank(pe, "pe", 3, "[H, kernel_size, D]")
    check_cu_seqlens(cu_seqlens)
    _check_positive(kernel_size=kernel_size, kernel_stride=kernel_stride)
    if pe is not None and weight is None:
        raise ValueError("pe: only used with weight (linear compression)")
    x = unit_last_stride(x)
    weight = None if weight is None else unit_last_stride(weight)
    pe = None if pe is None else unit_last_stride(pe)
    if cu_seqlens is None:
        rows, cu_cmp = _num_windows(x.shape[1], kernel_size, kernel_stride), None
    else:
        cu_cmp = _compressed_offsets(cu_seqlens, kernel_size, kernel_stride)
        # the output shape is data-dependent: the one host read of this op (API-imposed)
        rows = max(0, int(cu_cmp[-1]))
    direct = direct_call(x, weight, pe, cu_seqlens, cu_cmp)
    out = (_nsa_compress_fwd if direct else nsa_compress_fwd)(
        x, weight, pe, int(kernel_size), int(kernel_stride), int(rows), cu_seqlens, cu_cmp
    )
    return out, cu_cmp


# ----------------------------------------------------------------------------- combined


def nsa_attn(
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
    """``o = g_cmp·o_cmp + g_slc·o_slc + g_swa·o_swa`` per query head (gates ``[B, T, Hq]``).

    Not a single softmax (a gated sum of three, each with its own normaliser), so there is no
    one lse to return and no ``return_lse``: call the branch ops for their lse.

    Runs compressed attention, block selection (unless ``block_indices`` is given, which then
    replaces it), selected attention and the sliding window. Gradients flow to q, k, v, the
    gates and k_cmp/v_cmp (not through the selection).
    """
    check_rank(q, "q", 4, "[B, T, Hq, D]")  # before the gates, which are checked against q
    for g, name in ((g_cmp, "g_cmp"), (g_slc, "g_slc"), (g_swa, "g_swa")):
        check_rank(g, name, 3, "[B, T, Hq]")
        if g.shape != q.shape[:3]:
            raise ValueError(f"{name}: expected shape {tuple(q.shape[:3])}, got {tuple(g.shape)}")
    o_cmp, lse = nsa_compressed_attn(
        q, k_cmp, v_cmp, kernel_size=kernel_size, kernel_stride=kernel_stride, scale=scale,
        cu_seqlens=cu_seqlens, return_lse=True,
    )  # fmt: skip
    if block_indices is None:
        block_indices = nsa_topk_blocks(
            q, k_cmp, lse, kernel_size=kernel_size, kernel_stride=kernel_stride,
            block_size=block_size, topk=topk, init_blocks=init_blocks,
            local_blocks=local_blocks, scale=scale, cu_seqlens=cu_seqlens,
        )  # fmt: skip
    o_slc = nsa_selected_attn(
        q, k, v, block_indices, block_size=block_size, scale=scale, cu_seqlens=cu_seqlens
    )
    o_swa = sliding_window_attn(
        q, k, v, window_size=window_size, scale=scale, cu_seqlens=cu_seqlens
    )
    out = g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_swa[..., None] * o_swa
    return out.to(q.dtype)
