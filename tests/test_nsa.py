"""Native Sparse Attention ops against the float64 references (docs/api/nsa.md), on
the CPU and (attention branches) on CUDA.

Tolerances: tests/harness.py (the float64 reference computed from the same rounded inputs,
norm-wise and element-wise).
"""

from __future__ import annotations

import pytest
import torch
from harness import (
    BF16,
    DEVICES,
    F16,
    F32,
    F64,
    HAS_HOPPER,
    assert_close_to_ref,
    check_fwd_bwd,
    cuda_only,
    engine_path,
    leaf,
    rel_err,
)
from longattn.ops import nsa as N
from longattn.reference import nsa as R
from torch.autograd import gradcheck

QKV = ["o", "dq", "dk", "dv"]


def qkv(B, T, Hq, Hkv, D, dtype=F64, mag=1.0, Dv=None):
    q = (torch.randn(B, T, Hq, D, dtype=F64) * mag).to(dtype)
    k = torch.randn(B, T, Hkv, D, dtype=F64).to(dtype)
    v = torch.randn(B, T, Hkv, Dv or D, dtype=F64).to(dtype)
    return q, k, v


def random_indices(B, T, Hkv, n, block_size, extra_bad=True):
    """Distinct random blocks per row among those visible, −1 padded, plus (optionally) some
    out-of-range entries that the kernels must skip."""
    out = torch.full((B, T, Hkv, n), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            nb = t // block_size + 1
            for g in range(Hkv):
                m = int(torch.randint(1, n + 1, ()))
                sel = torch.randperm(nb)[:m]
                out[b, t, g, : sel.numel()] = sel.to(torch.int32)
                if extra_bad and sel.numel() < n and t % 3 == 0:
                    out[b, t, g, -1] = nb + int(torch.randint(0, 5, ()))  # future block
                if extra_bad and sel.numel() < n - 1 and t % 5 == 0:
                    out[b, t, g, -2] = -7
    return out


# ------------------------------------------------------------------ reference self-checks


def test_reference_selected_equals_dense_masked_softmax():
    B, T, Hq, Hkv, D, bs = 2, 37, 4, 2, 8, 8
    q, k, v = qkv(B, T, Hq, Hkv, D)
    idx = random_indices(B, T, Hkv, 3, bs)
    counts = torch.randint(0, 4, (B, T, Hkv))
    o, lse = R.nsa_selected_attn_reference(
        q, k, v, idx, block_size=bs, block_counts=counts, return_lse=True
    )
    mask = R.nsa_selection_mask(idx, bs, T, counts)
    o2, lse2 = R.nsa_dense_masked_attn(q, k, v, mask)
    assert rel_err(o, o2) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(lse2))
    assert rel_err(lse.nan_to_num(0, 0, 0), lse2.nan_to_num(0, 0, 0)) < 1e-12


def test_reference_window_and_compressed_equal_dense():
    B, T, Hq, Hkv, D = 1, 41, 3, 1, 8
    q, k, v = qkv(B, T, Hq, Hkv, D)
    o = R.sliding_window_attn_reference(q, k, v, window_size=6)
    o2, _ = R.nsa_dense_masked_attn(q, k, v, R.sliding_window_mask(T, 6)[None, None])
    assert rel_err(o, o2) < 1e-12
    kc, _ = R.nsa_compress_reference(k, kernel_size=8, kernel_stride=4)
    vc, _ = R.nsa_compress_reference(v, kernel_size=8, kernel_stride=4)
    oc, lse = R.nsa_compressed_attn_reference(q, kc, vc, kernel_size=8, kernel_stride=4)
    mask = R.compressed_visibility_mask(T, kc.shape[1], 8, 4)[None, None]
    oc2, lse2 = R.nsa_dense_masked_attn(q, kc, vc, mask)
    assert rel_err(oc, oc2) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(lse2))
    # mean compression == average pooling with stride d
    pooled = torch.nn.functional.avg_pool1d(k[0].permute(1, 2, 0), 8, 4).permute(2, 0, 1)
    assert rel_err(kc[0], pooled) < 1e-12


# ----------------------------------------------------------------------------- errors, CUDA


@cuda_only
def test_cuda_head_dim_limit():
    q, k, v = qkv(1, 8, 2, 1, 192, F32)
    with pytest.raises(ValueError, match="head dims"):
        N.sliding_window_attn(q.cuda(), k.cuda(), v.cuda())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda q, k, v, i: N.nsa_selected_attn(q, k[:, :5], v, i, block_size=4), "k"),
        (lambda q, k, v, i: N.nsa_selected_attn(q, k, v, i[..., 0], block_size=4), "block_indices"),
        (lambda q, k, v, i: N.nsa_selected_attn(q, k, v, i.float(), block_size=4), "block_indices"),
        (lambda q, k, v, i: N.nsa_selected_attn(q, k, v, i, block_size=0), "block_size"),
        (lambda q, k, v, i: N.sliding_window_attn(q, k.float(), v, window_size=4), "k"),
        (lambda q, k, v, i: N.sliding_window_attn(q, k, v, window_size=0), "window_size"),
        (lambda q, k, v, i: N.sliding_window_attn(q[:, :, :3], k, v), "k"),
        (
            lambda q, k, v, i: N.sliding_window_attn(
                q, k, v, cu_seqlens=torch.tensor([0, 5, 3], dtype=torch.int32)
            ),
            "cu_seqlens",
        ),
        (lambda q, k, v, i: N.nsa_compress(k, kernel_size=4, kernel_stride=0), "kernel_stride"),
        (
            lambda q, k, v, i: N.nsa_compress(
                k, kernel_size=4, kernel_stride=2, weight=torch.randn(2, 7, 8, dtype=F64)
            ),
            "weight",
        ),
        (
            lambda q, k, v, i: N.nsa_topk_blocks(
                q, k, torch.zeros(1, 12, 4), kernel_size=4, kernel_stride=3, block_size=4
            ),
            "kernel_stride",
        ),
        (
            lambda q, k, v, i: N.nsa_compressed_attn(
                q,
                k[:, :2],
                v[:, :2],
                cu_seqlens=torch.tensor([0, 12]),
                kernel_size=4,
                kernel_stride=2,
                return_lse=True,
            ),  # fmt: skip
            "k_cmp",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    q, k, v = qkv(1, 12, 4, 2, 8)
    idx = random_indices(1, 12, 2, 2, 4, extra_bad=False)
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, k, v, idx)


# ----------------------------------------------------------------------------- gradcheck (float64)


def test_gradcheck_selected_gqa3_block_counts():
    q, k, v = leaf(*qkv(1, 19, 3, 1, 4))
    idx = random_indices(1, 19, 1, 3, 4)
    counts = torch.randint(0, 4, (1, 19, 1), dtype=torch.int32)
    assert gradcheck(
        lambda q, k, v: N.nsa_selected_attn(q, k, v, idx, block_size=4, block_counts=counts),
        (q, k, v),
    )


def test_gradcheck_window_varlen():
    q, k, v = leaf(*qkv(1, 17, 4, 2, 4))
    cu = torch.tensor([0, 2, 11, 17], dtype=torch.int32)
    assert gradcheck(
        lambda q, k, v: N.sliding_window_attn(q, k, v, window_size=4, cu_seqlens=cu), (q, k, v)
    )


def test_gradcheck_compressed_attn_and_compress_varlen():
    cu = torch.tensor([0, 3, 14, 23], dtype=torch.int64)  # first sequence shorter than l
    q, k, v = leaf(*qkv(1, 23, 2, 1, 4))
    w = torch.randn(1, 4 * 4, 4, dtype=F64, requires_grad=True)
    pe = torch.randn(1, 4, 4, dtype=F64, requires_grad=True)

    def f(q, k, v, w, pe):
        kc, cu_c = N.nsa_compress(k, kernel_size=4, kernel_stride=2, weight=w, pe=pe, cu_seqlens=cu)
        vc, _ = N.nsa_compress(v, kernel_size=4, kernel_stride=2, cu_seqlens=cu)
        assert cu_c.tolist() == [0, 0, 4, 7]
        return N.nsa_compressed_attn(
            q, kc, vc, kernel_size=4, kernel_stride=2, cu_seqlens=cu, return_lse=False
        )

    assert gradcheck(f, (q, k, v, w, pe))


def test_gradcheck_nsa_attn_frozen_indices():
    T = 20
    q, k, v = leaf(*qkv(1, T, 2, 1, 4))
    gates = leaf(*torch.rand(3, 1, T, 2, dtype=F64).unbind(0))
    kc, vc = leaf(*torch.randn(2, 1, 4, 1, 4, dtype=F64).unbind(0))  # windows of l=8, d=4
    idx = random_indices(1, T, 1, 2, 8, extra_bad=False)

    def f(q, k, v, g1, g2, g3, kc, vc):
        return N.nsa_attn(
            q, k, v, g1, g2, g3, k_cmp=kc, v_cmp=vc, kernel_size=8, kernel_stride=4,
            block_size=8, topk=2, window_size=5, block_indices=idx,
        )  # fmt: skip

    assert gradcheck(f, (q, k, v, *gates, kc, vc))


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G", [1, 2, 3, 5, 8, 16])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_selected_vs_reference_gqa(G, dtype, device):
    Hkv, T, bs = 2 if G <= 3 else 1, 45, 8
    q, k, v = qkv(1, T, G * Hkv, Hkv, 16, dtype)
    idx = random_indices(1, T, Hkv, 3, bs)
    ref = lambda q, k, v: R.nsa_selected_attn_reference(q, k, v, idx, block_size=bs)  # noqa: E731
    ker = lambda q, k, v: N.nsa_selected_attn(q, k, v, idx.to(q.device), block_size=bs)  # noqa: E731
    check_fwd_bwd(ker, (q, k, v), dtype, device, ref_fn=ref, names=QKV)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_window_vs_reference_varlen_large_logits(dtype, device):
    cu = torch.tensor([0, 3, 40, 47], dtype=torch.int32)
    q, k, v = qkv(1, 47, 4, 2, 16, dtype, mag=25.0)  # |scores| ~ 100 with scale 1
    ref = lambda q, k, v: R.sliding_window_attn_reference(  # noqa: E731
        q, k, v, window_size=7, scale=1.0, cu_seqlens=cu
    )
    ker = lambda q, k, v: N.sliding_window_attn(  # noqa: E731
        q, k, v, window_size=7, scale=1.0, cu_seqlens=cu.to(q.device)
    )
    check_fwd_bwd(ker, (q, k, v), dtype, device, ref_fn=ref, names=QKV)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_compressed_attn_and_compress_vs_reference(dtype):
    cu = torch.tensor([0, 5, 50, 61], dtype=torch.int64)  # sequences shorter than l
    q, k, v = qkv(1, 61, 6, 2, 16, dtype)
    w = (torch.randn(2, 8 * 16, 16, dtype=F64) * 0.1).to(dtype)

    def run(ops, q, k, v, w):
        kc, _ = ops[0](k, kernel_size=8, kernel_stride=4, weight=w, cu_seqlens=cu)
        vc, _ = ops[0](v, kernel_size=8, kernel_stride=4, cu_seqlens=cu)
        # the reference always returns (o, lse)
        lse = {"return_lse": True} if ops[1] is N.nsa_compressed_attn else {}
        return ops[1](q, kc, vc, kernel_size=8, kernel_stride=4, cu_seqlens=cu, **lse)[0]

    ker = (N.nsa_compress, N.nsa_compressed_attn)
    ref = (R.nsa_compress_reference, R.nsa_compressed_attn_reference)
    check_fwd_bwd(
        lambda *a: run(ker, *a), (q, k, v, w), dtype, ref_fn=lambda *a: run(ref, *a),
        names=[*QKV, "dw"],
    )  # fmt: skip


def test_short_sequences_and_empty_rows():
    """T shorter than a window: compressed rows see nothing (o = 0, lse = −inf)."""
    q, k, v = qkv(2, 5, 2, 1, 8)
    kc, _ = N.nsa_compress(k, kernel_size=8, kernel_stride=4)
    assert kc.shape == (2, 0, 1, 8)
    kc2 = torch.randn(2, 1, 1, 8, dtype=F64)
    o, lse = N.nsa_compressed_attn(q, kc2, kc2, kernel_size=8, kernel_stride=4, return_lse=True)
    assert (o == 0).all() and torch.isneginf(lse).all()
    o = N.sliding_window_attn(q, k, v, window_size=64)
    assert rel_err(o, R.sliding_window_attn_reference(q, k, v, window_size=64)) < 1e-12


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("G", [1, 3, 4])
def test_topk_equals_reference_varlen(G):
    cu = torch.tensor([0, 7, 90, 150], dtype=torch.int32)
    Hkv = 2
    q, k, _ = qkv(1, 150, G * Hkv, Hkv, 16)
    kc, _ = N.nsa_compress(k, kernel_size=8, kernel_stride=4, cu_seqlens=cu)
    _, lse = N.nsa_compressed_attn(
        q, kc, kc, kernel_size=8, kernel_stride=4, cu_seqlens=cu, return_lse=True
    )
    kw = dict(
        kernel_size=8, kernel_stride=4, block_size=8, topk=4, init_blocks=1, local_blocks=2,
        cu_seqlens=cu,
    )  # fmt: skip
    got = N.nsa_topk_blocks(q, kc, lse, **kw)
    want = R.nsa_topk_blocks_reference(q, kc, lse, **kw)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    # forced blocks are present, rows sorted, −1 only at the end
    assert ((got == 0).any(-1)).all()
    valid = got >= 0
    assert torch.equal(valid, valid.cummin(-1).values)


def test_topk_batch_float32_matches_reference_and_feeds_selected():
    q, k, v = qkv(2, 80, 4, 2, 16, F32)
    kc, _ = N.nsa_compress(k, kernel_size=16, kernel_stride=8)
    vc, _ = N.nsa_compress(v, kernel_size=16, kernel_stride=8)
    _, lse = N.nsa_compressed_attn(q, kc, vc, kernel_size=16, kernel_stride=8, return_lse=True)
    kw = dict(kernel_size=16, kernel_stride=8, block_size=16, topk=3, init_blocks=0, local_blocks=1)
    got = N.nsa_topk_blocks(q, kc, lse, **kw)
    want = R.nsa_topk_blocks_reference(q, kc, lse, **kw)
    assert (got != want).float().mean() < 0.01  # float32 scores: near-ties may flip
    gates = torch.rand(3, 2, 80, 4).unbind(0)
    out = N.nsa_attn(
        q, k, v, *gates, k_cmp=kc, v_cmp=vc, kernel_size=16, kernel_stride=8, block_size=16,
        topk=3, window_size=20, init_blocks=0, local_blocks=1,
    )  # fmt: skip
    assert out.shape == q.shape and out.dtype == F32
    ref = R.nsa_attn_reference(
        *(t.double() for t in (q, k, v, *gates)), k_cmp=kc.double(), v_cmp=vc.double(),
        kernel_size=16, kernel_stride=8, block_size=16, window_size=20, block_indices=got,
    )  # fmt: skip
    assert_close_to_ref("nsa_attn", out, ref, F32)


# ----------------------------------------------------------------------------- CUDA kernels
#
# Against the dense masked float64 formulation on the GPU (fast at T of a few thousand), for
# both loop orders of selected attention (KV-outer for G <= KV_OUTER_MAX_GROUP, query-outer
# above), every range kind, dtypes f32/bf16/f16, head dims 64/128, block sizes 32/64/128.

# Tolerances: harness.TOL["cuda"] (float32 gradients 5e-5: dk/dv sum over the G heads and every
# token that selected a block, measured 1.5e-5 at G=16).


def _sorted_indices(B, T, Hkv, n, bs, device, bad=True):
    """Random distinct blocks per row (sorted, −1 padded), block 0 and the local block forced,
    plus out-of-range / negative entries when ``bad``."""
    nb = (T + bs - 1) // bs
    t = torch.arange(T)
    score = torch.rand(B, T, Hkv, nb)
    blk = torch.arange(nb)
    score = score.masked_fill(blk > (t // bs)[None, :, None, None], -1.0)
    score[..., 0] = 2.0
    score.scatter_(3, (t // bs)[None, :, None, None].expand(B, T, Hkv, 1), 3.0)
    top = score.topk(min(n, nb), dim=-1)
    idx = torch.where(top.values >= 0, top.indices, -1)
    idx = torch.where(idx >= 0, idx, nb + 10).sort(-1).values
    idx = torch.where(idx >= nb + 10, -1, idx)
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((B, T, Hkv, n - idx.shape[-1]), -1)], -1)
    if bad and n >= 2:
        idx[:, ::7, :, -1] = torch.where(idx[:, ::7, :, -1] < 0, nb + 3, idx[:, ::7, :, -1])
        idx[:, 3::11, :, -1] = torch.where(idx[:, 3::11, :, -1] < 0, -5, idx[:, 3::11, :, -1])
    return idx.to(torch.int32).to(device)


def _dense_ref(q, k, v, mask, scale=None):
    """float64 dense masked attention on q's device; mask [B, Hkv, T, S]."""
    return R.nsa_dense_masked_attn(q, k, v, mask, scale)


def _run_cuda(fn, ref_fn, shapes, dtype, mag=1.0):
    """fn(q, k, v) on CUDA in dtype vs ref_fn(q, k, v) in float64 on CUDA (same rounded
    inputs); forward, lse (if fn returns it) and gradients."""
    (B, T, Hq, Hkv, D, Dv) = shapes
    q, k, v = qkv(B, T, Hq, Hkv, D, dtype, mag, Dv)
    lse = {}

    def run(f, key):
        def out_only(q, k, v):
            o, lse[key] = f(q, k, v)
            return o

        return out_only

    check_fwd_bwd(
        run(fn, "lo"), (q, k, v), dtype, "cuda", ref_fn=run(ref_fn, "hi"), ref_device="cuda",
        names=QKV,
    )  # fmt: skip
    if lse["lo"] is not None:
        fin = torch.isfinite(lse["hi"])
        assert torch.equal(fin, torch.isfinite(lse["lo"])), "lse: -inf rows differ"
        assert (lse["lo"][fin].double() - lse["hi"][fin]).abs().max().item() < (
            1e-4 if dtype == F32 else 5e-2
        )


@cuda_only
@pytest.mark.parametrize("G", [1, 2, 3, 4, 6, 8, 16])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
def test_cuda_selected_gqa(G, dtype):
    B, T, Hkv, D, bs, n = 2, 333, 2, 64, 32, 5
    idx = _sorted_indices(B, T, Hkv, n, bs, "cuda")
    counts = torch.randint(0, n + 2, (B, T, Hkv), dtype=torch.int32, device="cuda")
    mask = R.nsa_selection_mask(idx, bs, T, counts)

    def fn(q, k, v):
        return N.nsa_selected_attn(
            q, k, v, idx, block_size=bs, block_counts=counts, return_lse=True
        )

    _run_cuda(fn, lambda q, k, v: _dense_ref(q, k, v, mask), (B, T, G * Hkv, Hkv, D, D), dtype)


@cuda_only
@pytest.mark.parametrize("bs", [32, 64, 128])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("G", [1, 16])
def test_cuda_selected_block_sizes_head_dims(bs, D, G):
    B, T, Hkv, n = 1, 1500, 2, 6
    idx = _sorted_indices(B, T, Hkv, n, bs, "cuda")
    mask = R.nsa_selection_mask(idx, bs, T)

    def fn(q, k, v):
        return N.nsa_selected_attn(q, k, v, idx, block_size=bs, return_lse=True)

    _run_cuda(fn, lambda q, k, v: _dense_ref(q, k, v, mask), (B, T, G * Hkv, Hkv, D, D), BF16)


@cuda_only
@pytest.mark.parametrize("G", [1, 4, 16])
def test_cuda_selected_long_lists_split(G):
    """T = 4100 > the dK/dV chunk of a list: block 0 (selected by every token) is split."""
    B, T, Hkv, D, bs, n = 1, 4100, 1, 64, 64, 3
    idx = _sorted_indices(B, T, Hkv, n, bs, "cuda", bad=False)
    mask = R.nsa_selection_mask(idx, bs, T)

    def fn(q, k, v):
        return N.nsa_selected_attn(q, k, v, idx, block_size=bs, block_counts=2, return_lse=True)

    mask = R.nsa_selection_mask(idx, bs, T, 2)
    _run_cuda(fn, lambda q, k, v: _dense_ref(q, k, v, mask), (B, T, G * Hkv, Hkv, D, D), F32)


@cuda_only
@pytest.mark.parametrize(
    "G, bs, D, Dv, dtype",
    [
        (16, 16, 64, 64, BF16),
        (16, 100, 128, 128, F32),
        (16, 64, 128, 64, F16),
        (16, 100, 128, 128, BF16),
        (32, 100, 64, 128, BF16),
        (32, 16, 128, 128, F16),
        (32, 64, 64, 64, F32),
        (20, 100, 128, 128, BF16),  # a second head chunk with 4 of its 16 rows valid
        (4, 256, 64, 64, BF16),  # blocks > 128 run query-outer at any group size
    ],
)
def test_cuda_selected_query_outer_varlen(G, bs, D, Dv, dtype):
    """The query-outer kernels (G > KV_OUTER_MAX_GROUP): 4 warps split every 64-key tile by
    columns and merge; tiles double-buffered across block boundaries. Packed sequences, block
    sizes below, above and not a multiple of the tile, several tiles per token, block counts."""
    cu = [0, 3, 200, 777]
    Hkv, n, T = 2, 4, cu[-1]
    idx = torch.full((1, T, Hkv, n), -1, dtype=torch.int32, device="cuda")
    counts = torch.randint(0, n + 1, (1, T, Hkv), dtype=torch.int32, device="cuda")
    mask = torch.zeros(1, Hkv, T, T, dtype=torch.bool, device="cuda")
    for s, e in zip(cu[:-1], cu[1:], strict=True):
        idx[:, s:e] = _sorted_indices(1, e - s, Hkv, n, bs, "cuda")
        mask[..., s:e, s:e] = R.nsa_selection_mask(idx[:, s:e], bs, e - s, counts[:, s:e])
    cu_t = torch.tensor(cu, dtype=torch.int32, device="cuda")

    def fn(q, k, v):
        return N.nsa_selected_attn(
            q, k, v, idx, block_size=bs, block_counts=counts, cu_seqlens=cu_t, return_lse=True
        )

    _run_cuda(fn, lambda q, k, v: _dense_ref(q, k, v, mask), (1, T, G * Hkv, Hkv, D, Dv), dtype)


@cuda_only
@pytest.mark.parametrize("G", [1, 3, 16])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cuda_selected_varlen_large_logits(G, dtype):
    cu = torch.tensor([0, 5, 40, 41, 300, 333], dtype=torch.int64)
    Hkv, D, bs, n = 2, 64, 32, 4
    T = int(cu[-1])
    idx = torch.full((1, T, Hkv, n), -1, dtype=torch.int32)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        if e > s:
            idx[:, s:e] = _sorted_indices(1, e - s, Hkv, n, bs, "cpu")
    q, k, v = qkv(1, T, G * Hkv, Hkv, D, dtype, mag=12.0)  # |scores| ~ 100

    def run(ker, q, k, v):
        return (N.nsa_selected_attn if ker else R.nsa_selected_attn_reference)(
            q, k, v, idx.to(q.device), block_size=bs, cu_seqlens=cu.to(q.device), scale=1.0
        )

    check_fwd_bwd(
        lambda *a: run(True, *a), (q, k, v), dtype, "cuda", ref_fn=lambda *a: run(False, *a),
        names=QKV,
    )  # fmt: skip


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize(
    "D, Dv, G, W, T",
    [(64, 64, 1, 512, 2048), (128, 128, 4, 100, 777), (128, 64, 3, 33, 300), (40, 72, 16, 64, 129)],
)
def test_cuda_window(dtype, D, Dv, G, W, T):
    Hkv = 2
    mask = R.sliding_window_mask(T, W, device="cuda")[None, None].expand(1, Hkv, T, T)

    def fn(q, k, v):
        o = N.sliding_window_attn(q, k, v, window_size=W)
        return o, None

    def ref(q, k, v):
        return _dense_ref(q, k, v, mask)[0], None

    _run_cuda(fn, ref, (1, T, G * Hkv, Hkv, D, Dv), dtype)


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize(
    "D, G, T, ks, d",
    [(64, 1, 2048, 32, 16), (128, 16, 600, 32, 16), (64, 3, 100, 16, 8), (128, 2, 31, 32, 16)],
)
def test_cuda_compressed(dtype, D, G, T, ks, d):
    Hkv = 2
    C = max(0, (T - ks) // d + 1)
    kc = torch.randn(1, max(C, 1), Hkv, D, dtype=F64).to(dtype)[:, :C]
    vc = torch.randn(1, max(C, 1), Hkv, D, dtype=F64).to(dtype)[:, :C]
    mask = R.compressed_visibility_mask(T, C, ks, d, device="cuda")[None, None].expand(1, Hkv, T, C)
    q = (torch.randn(1, T, G * Hkv, D, dtype=F64)).to(dtype)
    lse = {}

    def ker(q, kc, vc):
        o, lse["lo"] = N.nsa_compressed_attn(
            q, kc, vc, kernel_size=ks, kernel_stride=d, return_lse=True
        )
        return o

    def ref(q, kc, vc):
        o, lse["hi"] = _dense_ref(q, kc, vc, mask)
        return o

    check_fwd_bwd(
        ker, (q, kc, vc), dtype, "cuda", ref_fn=ref, ref_device="cuda",
        names=["o", "dq", "dk_cmp", "dv_cmp"],
    )  # fmt: skip
    assert torch.equal(torch.isfinite(lse["lo"]), torch.isfinite(lse["hi"]))


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cuda_compressed_varlen(dtype):
    cu = torch.tensor([0, 5, 50, 61, 140], dtype=torch.int64)  # sequences shorter than l
    q, k, v = qkv(1, 140, 6, 2, 64, dtype)
    kc, _ = R.nsa_compress_reference(k, kernel_size=8, kernel_stride=4, cu_seqlens=cu)
    vc, _ = R.nsa_compress_reference(v, kernel_size=8, kernel_stride=4, cu_seqlens=cu)

    def run(ker, q, kc, vc):
        f = N.nsa_compressed_attn if ker else R.nsa_compressed_attn_reference
        return f(q, kc, vc, kernel_size=8, kernel_stride=4, cu_seqlens=cu.to(q.device))[0]

    check_fwd_bwd(
        lambda *a: run(True, *a), (q, kc, vc), dtype, "cuda", ref_fn=lambda *a: run(False, *a),
        names=QKV,
    )  # fmt: skip


@cuda_only
@pytest.mark.parametrize("T", [1, 2, 63, 65])
def test_cuda_tiny_lengths(T):
    q, k, v = qkv(1, T, 4, 2, 64, BF16)
    idx = _sorted_indices(1, T, 2, 3, 32, "cpu")
    for fn, ref in [
        (
            lambda q, k, v: N.sliding_window_attn(q, k, v, window_size=16),
            lambda q, k, v: R.sliding_window_attn_reference(q, k, v, window_size=16),
        ),
        (
            lambda q, k, v: N.nsa_selected_attn(q, k, v, idx.to(q.device), block_size=32),
            lambda q, k, v: R.nsa_selected_attn_reference(q, k, v, idx, block_size=32),
        ),
    ]:
        check_fwd_bwd(fn, (q, k, v), BF16, "cuda", ref_fn=ref, names=QKV)


@cuda_only
def test_cuda_nsa_attn_layer():
    """The gated combination on CUDA (given block indices) vs the float64 reference."""
    T, Hq, Hkv, D = 300, 8, 2, 64
    q, k, v = qkv(1, T, Hq, Hkv, D, BF16)
    gates = [torch.rand(1, T, Hq, dtype=F64).to(BF16) for _ in range(3)]
    kc, _ = R.nsa_compress_reference(k.double(), kernel_size=32, kernel_stride=16)
    vc, _ = R.nsa_compress_reference(v.double(), kernel_size=32, kernel_stride=16)
    kc, vc = kc.to(BF16), vc.to(BF16)
    idx = _sorted_indices(1, T, Hkv, 4, 64, "cpu", bad=False)
    kw = dict(kernel_size=32, kernel_stride=16, block_size=64, topk=4, window_size=128)

    def run(ker, q, k, v, g1, g2, g3, kc, vc):
        f = N.nsa_attn if ker else R.nsa_attn_reference
        return f(q, k, v, g1, g2, g3, k_cmp=kc, v_cmp=vc, block_indices=idx.to(q.device), **kw)

    check_fwd_bwd(
        lambda *a: run(True, *a), (q, k, v, *gates, kc, vc), BF16, "cuda",
        ref_fn=lambda *a: run(False, *a), names=[*QKV, "dg1", "dg2", "dg3", "dkc", "dvc"],
    )  # fmt: skip


@cuda_only
@pytest.mark.parametrize("Hq", [2, 16])  # KV-outer and query-outer dQ
def test_cuda_selected_deterministic(Hq):
    T, Hkv, D = 5000, 1, 64
    q, k, v = (t.cuda().requires_grad_() for t in qkv(1, T, Hq, Hkv, D, BF16))
    idx = _sorted_indices(1, T, Hkv, 4, 64, "cuda", bad=False)
    do = torch.randn(1, T, Hq, D, device="cuda", dtype=BF16)
    grads = []
    for _ in range(2):
        o = N.nsa_selected_attn(q, k, v, idx, block_size=64)
        grads.append(torch.autograd.grad(o, (q, k, v), do))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@cuda_only
@pytest.mark.parametrize(
    "force_sm80, pingpong",
    [(False, "0"), (False, "1"), (True, "0")],
    ids=["engine", "pingpong", "sm80"],
)
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize(
    "D, G, W, T, cu",
    [
        (128, 1, 512, 1000, None),  # rows not a multiple of the 128-row tile
        (64, 16, 100, 777, None),  # GQA, a window shorter than a key tile
        (128, 4, 64, 333, [0, 70, 71, 71, 200, 333]),  # empty and one-token sequences
        (64, 2, 1000, 300, [0, 129, 300]),  # a window longer than the sequences
    ],
)
def test_cuda_window_engine(dtype, D, G, W, T, cu, force_sm80, pingpong, monkeypatch):
    check_path = engine_path(monkeypatch, force_sm80)
    monkeypatch.setenv("LONGATTN_SM90_PINGPONG", pingpong)
    Hkv = 2
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = qkv(1, T, G * Hkv, Hkv, D, dtype)
    ref = lambda q, k, v: R.sliding_window_attn_reference(  # noqa: E731
        q, k, v, window_size=W, cu_seqlens=cu_t
    )
    ker = lambda q, k, v: N.sliding_window_attn(  # noqa: E731
        q, k, v, window_size=W, cu_seqlens=None if cu_t is None else cu_t.cuda()
    )
    check_fwd_bwd(ker, (q, k, v), dtype, "cuda", ref_fn=ref, names=QKV)
    check_path()


@cuda_only
@pytest.mark.parametrize("force_sm80", [False, True], ids=["engine", "sm80"])
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize(
    "D, G, T, ks, d, cu, mag",
    [
        (128, 4, 1000, 32, 16, None, 1.0),  # rows and compressed keys past a tile multiple
        (64, 16, 700, 16, 8, None, 6.0),  # GQA, large logits
        (128, 2, 900, 32, 16, [0, 20, 21, 400, 900], 4.0),  # sequences shorter than a window
    ],
)
def test_cuda_compressed_engine(dtype, D, G, T, ks, d, cu, mag, force_sm80, monkeypatch):
    check_path = engine_path(monkeypatch, force_sm80)
    Hkv = 2
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int64)
    q, k, v = qkv(1, T, G * Hkv, Hkv, D, dtype, mag=mag)
    kc, _ = R.nsa_compress_reference(k.double(), kernel_size=ks, kernel_stride=d, cu_seqlens=cu_t)
    vc, _ = R.nsa_compress_reference(v.double(), kernel_size=ks, kernel_stride=d, cu_seqlens=cu_t)
    kc, vc = kc.to(dtype), vc.to(dtype)

    def run(ker, q, kc, vc):
        f = N.nsa_compressed_attn if ker else R.nsa_compressed_attn_reference
        cuv = None if cu_t is None else cu_t.to(q.device)
        return f(q, kc, vc, kernel_size=ks, kernel_stride=d, cu_seqlens=cuv)[0]

    check_fwd_bwd(
        lambda *a: run(True, *a), (q, kc, vc), dtype, "cuda", ref_fn=lambda *a: run(False, *a),
        names=QKV,
    )  # fmt: skip
    check_path()


@cuda_only
@pytest.mark.parametrize("cu", [None, [0, 1500, 1501, 2900]], ids=["dense", "varlen"])
def test_cuda_window_engine_backward(cu, monkeypatch):
    """The window backward on its own (large logits, GQA, a window that is not a multiple of the
    tiles): against the float64 reference norm-wise and element-wise, the Hopper kernels ran
    (row table, dQ, dK/dV: two engine launches), and the gradients are the same bits twice."""
    from longattn import _native

    check_path = engine_path(monkeypatch, False)
    T, Hq, Hkv, D, W = 2900, 8, 2, 128, 700
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
    q, k, v = qkv(1, T, Hq, Hkv, D, BF16, mag=6.0)
    x64 = leaf(*(t.to(F64) for t in (q, k, v)))
    o64 = R.sliding_window_attn_reference(*x64, window_size=W, cu_seqlens=cu_t)
    do = torch.randn(o64.shape, dtype=F64).to(BF16).to(F64)  # what the kernel gets
    ref = torch.autograd.grad(o64, x64, do)
    xs = leaf(*(t.cuda() for t in (q, k, v)))
    o = N.sliding_window_attn(*xs, window_size=W, cu_seqlens=None if cu_t is None else cu_t.cuda())
    before = _native.sm90_launch_count()
    grads = [torch.autograd.grad(o, xs, do.to(BF16).cuda(), retain_graph=True) for _ in range(2)]
    check_path()
    if HAS_HOPPER:
        assert _native.sm90_launch_count() - before == 4  # dQ and dK/dV, twice
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    for name, a, b in zip(["dq", "dk", "dv"], grads[0], ref, strict=True):
        assert_close_to_ref(name, a, b, BF16, "cuda", grad=True)  # norm- and element-wise
