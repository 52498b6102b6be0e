"""landmark_attn against the float64 reference (docs/api/landmark.md).

Tolerances: tests/harness.py (norm-wise and element-wise), gradients within the outputs'
tolerance (harness.TOL's output column: float32 within 1e-5 on CUDA too).
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import (
    BF16,
    F16,
    F32,
    F64,
    assert_close_to_ref,
    check_fwd_bwd,
    cuda_only,
    engine_path,
    poison_,
    rel_err,
    tolerance,
)
from longattn.ops.landmark import (
    insert_landmarks,
    landmark_attn,
    landmark_topk_blocks,
    remove_landmarks,
)
from longattn.reference.landmark import (
    landmark_attn_reference,
    landmark_topk_blocks_reference,
    landmark_weights_reference,
)

I16, I32, I64 = torch.int16, torch.int32, torch.int64


def make(B, Tq, Tk, Hq, Hkv, D, dtype=F64, device="cpu", E=None, grad=False):
    q = torch.randn(B, Tq, Hq, D, device=device).to(dtype)
    k = torch.randn(B, Tk, Hkv, D, device=device).to(dtype)
    v = torch.randn(B, Tk, Hkv, E or D, device=device).to(dtype)
    return [x.requires_grad_(grad) for x in (q, k, v)]


def naive_loops(q, k, v, bs, scale):
    """The formulas of docs/api/landmark.md, one query at a time (B = 1, Hq = Hkv = 1)."""
    q, k, v = q[0, :, 0].double(), k[0, :, 0].double(), v[0, :, 0].double()
    lq, lk = q.shape[0], k.shape[0]
    out = torch.zeros(lq, v.shape[1], dtype=F64)
    for i in range(lq):
        pos = i + lk - lq
        c = pos // bs
        s = (k[: pos + 1] @ q[i]) * scale
        cur = [p for p in range(c * bs, pos + 1) if p != c * bs + bs - 1]
        z = sum(math.exp(s[p]) for p in cur) + sum(math.exp(s[j * bs + bs - 1]) for j in range(c))
        o = sum(math.exp(s[p]) / z * v[p] for p in cur)
        for j in range(c):
            ords = list(range(j * bs, j * bs + bs - 1))
            inner = sum(math.exp(s[p]) for p in ords)
            gate = math.exp(s[j * bs + bs - 1]) / z
            o = o + sum(gate * math.exp(s[p]) / inner * v[p] for p in ords)
        out[i] = o
    return out


@pytest.mark.parametrize("Tq,Tk,bs", [(13, 13, 4), (9, 17, 5), (20, 20, 2)])
def test_reference_matches_spec_loops(Tq, Tk, bs):
    q, k, v = make(1, Tq, Tk, 1, 1, 4)
    ref = landmark_attn_reference(q, k, v, block_size=bs, scale=0.7)
    assert rel_err(ref[0, :, 0], naive_loops(q, k, v, bs, 0.7)) < 1e-12


GRAD_CASES = [
    # B, Tq, Tk, Hq, Hkv, D, bs
    (2, 23, 23, 2, 2, 8, 4),  # T not a multiple of the block
    (1, 19, 31, 4, 2, 6, 5),  # Tk > Tq, GQA
    (1, 160, 160, 2, 1, 4, 51),  # the paper's block size
    (1, 7, 7, 1, 1, 3, 64),  # a single partial block
    (1, 150, 150, 2, 1, 3, 65),  # on CUDA a block of two key tiles, the second only the landmark
]


def vs_reference(q, k, v, bs, dtype, device, idx=None, cu=None, tol=None):
    """landmark_attn of q, k, v on ``device``: output and gradients against the float64
    reference (run on the same device), within ``tol`` (default the outputs' tolerance of
    harness.TOL, for the gradients too)."""
    tol = tolerance(dtype, device) if tol is None else tol

    def run(f):
        def call(q, k, v):
            i = None if idx is None else idx.to(q.device)
            c = None if cu is None else cu.to(q.device)
            return f(q, k, v, block_size=bs, block_indices=i, cu_seqlens=c)

        return call

    outs = check_fwd_bwd(
        run(landmark_attn), (q, k, v), dtype, device, ref_fn=run(landmark_attn_reference),
        ref_device=device, names=["o", "dq", "dk", "dv"], tol=tol, grad_tol=tol,
    )  # fmt: skip
    assert all(a.dtype == dtype for a, _ in outs)
    return outs


def grads_vs_reference(B, Tq, Tk, Hq, Hkv, D, bs, device, idx=None, cu=None, dtype=F32, tol=2e-5):
    """CUDA has no float64 kernels: its gradients are checked against the float64 reference."""
    q, k, v = make(B, Tq, Tk, Hq, Hkv, D, dtype=dtype, device=device)
    vs_reference(q, k, v, bs, dtype, device, idx, cu, tol)


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "x".join(map(str, c)))
def test_gradcheck(case, device):
    B, Tq, Tk, Hq, Hkv, D, bs = case
    if device == "cuda":
        grads_vs_reference(B, Tq, Tk, Hq, Hkv, D, bs, device)
        return
    q, k, v = make(B, Tq, Tk, Hq, Hkv, D, grad=True)
    torch.autograd.gradcheck(
        lambda q, k, v: landmark_attn(q, k, v, block_size=bs), (q, k, v), atol=1e-8
    )


def retrieval_indices(B, Tq, Tk, Hkv, bs, n, gen=None):
    nb = Tk // bs + 1
    return torch.randint(-1, nb + 1, (B, Tq, Hkv, n), dtype=torch.int32, generator=gen)


def test_gradcheck_retrieval(device):
    B, Tq, Tk, Hq, Hkv, D, bs = 1, 21, 29, 4, 2, 5, 4
    idx = retrieval_indices(B, Tq, Tk, Hkv, bs, 3)
    if device == "cuda":
        grads_vs_reference(B, Tq, Tk, Hq, Hkv, D, bs, device, idx=idx)
        return
    q, k, v = make(B, Tq, Tk, Hq, Hkv, D, grad=True)
    torch.autograd.gradcheck(
        lambda q, k, v: landmark_attn(q, k, v, block_size=bs, block_indices=idx),
        (q, k, v),
        atol=1e-8,
    )


def test_gradcheck_varlen(device):
    cu = torch.tensor([0, 7, 7, 19, 30], dtype=torch.int32)
    if device == "cuda":
        grads_vs_reference(1, 30, 30, 2, 1, 4, 4, device, cu=cu)
        return
    q, k, v = make(1, 30, 30, 2, 1, 4, grad=True)
    torch.autograd.gradcheck(
        lambda q, k, v: landmark_attn(q, k, v, block_size=4, cu_seqlens=cu), (q, k, v), atol=1e-8
    )


NUM_CASES = [
    # B, Tq, Tk, Hq, Hkv, D, bs
    (1, 300, 300, 2, 1, 64, 64),
    (2, 200, 260, 4, 2, 128, 51),
    (1, 257, 257, 2, 2, 64, 5),
]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("case", NUM_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("retrieval", [False, True], ids=["train", "retrieval"])
def test_vs_reference(case, dtype, retrieval, device):
    B, Tq, Tk, Hq, Hkv, D, bs = case
    q, k, v = make(B, Tq, Tk, Hq, Hkv, D, dtype=dtype, device=device)
    idx = retrieval_indices(B, Tq, Tk, Hkv, bs, 4) if retrieval else None
    vs_reference(q, k, v, bs, dtype, device, idx)


PEAKED_CASES = [
    # T, bs: one query tile; several 64-tiles with blocks of 5 (several blocks per key tile),
    # 64 (one block per key tile) and 100 (on CUDA a block spans two key tiles: LM_MULTI)
    (2, 4),
    (150, 5),
    (150, 64),
    (150, 100),
]


def peaked_queries(k, hq, bs, gap=8.0):
    """q of magnitude 8 (logits ~8σ) plus a multiple of one visible key per row (its own, or the
    previous token's at a landmark position) that puts this key's logit `gap` above every other
    visible logit: nearly one-hot attention (P ≈ 0.9997) on every row."""
    b, t, hkv, d = k.shape
    kk = k.double().repeat_interleave(hq // hkv, 2)
    q = 8 * torch.randn(b, t, hq, d, dtype=F64)
    scale = d**-0.5
    pos = torch.arange(t)
    target = torch.where(pos % bs == bs - 1, pos - 1, pos)
    s = scale * torch.einsum("bihd,bjhd->bihj", q, kk)
    others = (pos[None, :] <= pos[:, None]) & (pos[None, :] != target[:, None])
    top_other = s.masked_fill(~others[:, None, :], -math.inf).amax(-1)
    kt = kk[:, target]
    s_target = scale * (q * kt).sum(-1)
    beta = (top_other + gap - s_target) / (scale * (kt * kt).sum(-1))
    return q + torch.where(top_other.isfinite(), beta, 0.0)[..., None] * kt


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("T,bs", PEAKED_CASES, ids=lambda c: str(c))
def test_peaked_attention_grads(T, bs, dtype, device):
    """Nearly one-hot attention: dP − Δ is tiny, so Δ from the 16-bit output alone is off by its
    rounding (dq, dk ~1.5 eps off, 10x more for T = 2); Δ from out + out_lo is accurate."""
    k, v = (torch.randn(1, T, 2, 32, dtype=F64).to(dtype) for _ in range(2))
    q = peaked_queries(k, 4, bs).to(dtype)
    check_fwd_bwd(
        lambda q, k, v: landmark_attn(q, k, v, block_size=bs), (q, k, v), dtype, device,
        ref_fn=lambda q, k, v: landmark_attn_reference(q, k, v, block_size=bs),
        names=["o", "dq", "dk", "dv"], grad_tol=torch.finfo(dtype).eps,
    )  # fmt: skip


@pytest.mark.parametrize("bs,T", [(6, 40), (100, 330)])
def test_weights_sum_to_one_and_landmarks_zero(bs, T, device):
    """V = identity: o_i is row i of the weight matrix (float32 on CUDA)."""
    dt = F64 if device == "cpu" else F32
    tol = 1e-12 if device == "cpu" else 1e-6
    q = torch.randn(1, T, 1, 8, dtype=F64).to(device, dt)
    k = torch.randn(1, T, 1, 8, dtype=F64).to(device, dt)
    eye = torch.eye(T, dtype=dt, device=device)
    w = torch.cat(  # [T, T], in column chunks of at most 128 (the CUDA head-dim limit)
        [landmark_attn(q, k, eye[None, :, None, c : c + 128], block_size=bs)[0, :, 0]
         for c in range(0, T, 128)],
        dim=-1,
    )  # fmt: skip
    assert torch.allclose(w.sum(-1), torch.ones(T, dtype=dt, device=device), atol=tol)
    landmark_cols = torch.arange(bs - 1, T, bs)
    assert (w[:, landmark_cols] == 0).all()
    assert torch.triu(w, diagonal=1).abs().max() == 0  # causal
    assert torch.allclose(w[0], eye[0])  # query 0 attends to itself only
    ref = landmark_weights_reference(q.double(), k.double(), block_size=bs)[0][0]
    assert rel_err(w, ref) < tol
    # landmark row: its block's ordinary tokens directly, no self-attention
    row = bs - 1
    assert w[row, row] == 0
    assert abs(w[row, :row].sum().item() - 1.0) < tol
    # first token after a landmark: gate of block 0 plus itself
    assert w[bs, bs] > 0 and w[bs, : bs - 1].sum() > 0


def test_topk_covering_all_blocks_equals_training(device):
    B, T, Hq, Hkv, D, bs = 2, 90, 4, 2, 16, 8
    q, k, v = make(B, T, T, Hq, Hkv, D, dtype=F32, device=device)
    n_blocks = T // bs
    idx = landmark_topk_blocks(q, k, block_size=bs, topk=n_blocks + 2)
    a = landmark_attn(q, k, v, block_size=bs, block_indices=idx)
    b = landmark_attn(q, k, v, block_size=bs)
    assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
def test_topk_vs_reference(dtype, device):
    if device == "cuda" and dtype == F64:
        pytest.skip("the CUDA kernels take float32, float16 and bfloat16")
    q, k, _ = make(1, 70, 100, 4, 2, 16, dtype=dtype)
    got = landmark_topk_blocks(q.to(device), k.to(device), block_size=8, topk=3)
    ref = landmark_topk_blocks_reference(q, k, block_size=8, topk=3)
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), ref)
    cu = torch.tensor([0, 30, 70], dtype=torch.int64)
    got = landmark_topk_blocks(
        q.to(device), k[:, :70].to(device), block_size=5, topk=2, cu_seqlens=cu.to(device)
    )
    ref = landmark_topk_blocks_reference(q, k[:, :70], block_size=5, topk=2, cu_seqlens=cu)
    assert torch.equal(got.cpu(), ref)


def test_varlen_equals_separate_calls():
    q, k, v = make(1, 50, 50, 2, 2, 8, dtype=F32)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    out = landmark_attn(q, k, v, block_size=7, cu_seqlens=cu)
    for s, e in ((0, 20), (20, 50)):
        sep = landmark_attn(q[:, s:e], k[:, s:e], v[:, s:e], block_size=7)
        assert rel_err(out[:, s:e], sep) < 1e-6


def test_strided_inputs():
    q, k, v = make(1, 40, 40, 4, 4, 8, dtype=F32)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, T, H, D] view of [B, H, T, D]
    kx = k[:, :, :1].expand(1, 40, 4, 8)  # stride-0 heads
    a = landmark_attn(qt, kx, v, block_size=6)
    b = landmark_attn(q, kx.contiguous(), v, block_size=6)
    assert torch.equal(a, b)


def test_insert_remove_landmarks():
    ids = torch.arange(1, 12)[None]  # 11 tokens
    out = insert_landmarks(ids, landmark_id=-5, block_size=4)
    assert out.tolist() == [[1, 2, 3, -5, 4, 5, 6, -5, 7, 8, 9, -5, 10, 11]]
    assert torch.equal(remove_landmarks(out, block_size=4), ids)


@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(block_size=1), ValueError, "block_size"),
        (dict(q=torch.randn(8, 4, 4)), ValueError, "q"),
        (dict(q=torch.randn(1, 8, 3, 4)), ValueError, "Hq = 3"),
        (dict(k=torch.randn(1, 8, 3, 4)), ValueError, "k"),
        (dict(k=torch.randn(1, 4, 2, 4), v=torch.randn(1, 4, 2, 4)), ValueError, "k"),
        (dict(v=torch.randn(1, 9, 2, 4)), ValueError, "v"),
        (dict(k=torch.randn(1, 8, 2, 4, dtype=F64)), TypeError, "k"),
        (dict(q=torch.randn(1, 8, 4, 300)), ValueError, "k"),
        (dict(block_indices=torch.zeros(1, 8, 2, 2, dtype=I16)), TypeError, "block_indices"),
        (dict(block_indices=torch.zeros(1, 7, 2, 2, dtype=I32)), ValueError, "block_indices"),
        (dict(cu_seqlens=torch.tensor([0, 9], dtype=torch.int32)), ValueError, "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, "cu_seqlens"),
    ],
)
def test_bad_inputs_raise(kwargs, exc, name):
    args = dict(
        q=torch.randn(1, 8, 4, 4, 1)[..., 0],
        k=torch.randn(1, 8, 2, 4),
        v=torch.randn(1, 8, 2, 4),
    )
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=name):
        landmark_attn(q, k, v, **args)


@cuda_only
@pytest.mark.parametrize(
    "kwargs,exc,name",
    [
        (dict(dtype=F64), TypeError, "q"),
        (dict(D=256), ValueError, "head dims up to 128"),
    ],
)
def test_cuda_unsupported_raise(kwargs, exc, name):
    D = kwargs.get("D", 8)
    q = torch.randn(1, 8, 2, D, device="cuda").to(kwargs.get("dtype", F32))
    with pytest.raises(exc, match=name):
        landmark_attn(q, q, q, block_size=kwargs.get("block_size", 4))


def test_opcheck():
    q, k, v = make(1, 12, 12, 2, 1, 4, dtype=F64, grad=True)
    idx = retrieval_indices(1, 12, 12, 1, 4, 2)
    torch.library.opcheck(torch.ops.longattn.landmark_fwd, (q, k, v, idx, 4, 0.5, None))
    q, k, v = (x.detach().to(BF16).requires_grad_() for x in (q, k, v))
    args = (q, k, v, idx, 4, 0.5, None, True)  # with out's rounding residual
    torch.library.opcheck(torch.ops.longattn.landmark_fwd, args)


# ---------------------------------------------------------------------------------------------
# CUDA kernels against the float64 reference (docs/api/landmark.md; every case also checks that the
# error is at most about twice that of the reference evaluated in the kernel's dtype)

CUDA_CASES = [
    # B, Tq, Tk, Hq, Hkv, D, bs, retrieval
    (1, 300, 300, 2, 1, 64, 64, False),  # T not a multiple of the block, GQA
    (2, 200, 260, 4, 2, 128, 51, False),  # Tk > Tq, the paper's block size
    (1, 257, 257, 2, 2, 64, 5, False),  # tiny blocks, 12 per key tile
    (1, 130, 130, 2, 2, 128, 4, False),
    (1, 97, 97, 3, 1, 40, 2, False),  # smallest block, padded head dim, MQA
    (1, 300, 300, 4, 2, 64, 64, True),  # retrieval with -1 and out-of-range entries
    (2, 150, 190, 2, 1, 128, 5, True),
    # blocks longer than a 64-key tile (a statistics pass per block)
    (1, 700, 700, 2, 1, 64, 100, False),  # tiles of 64 + 36 keys, ragged tail, GQA
    (2, 500, 650, 4, 2, 128, 128, False),  # Tk > Tq, two full tiles per block
    (1, 1500, 1500, 2, 2, 64, 200, False),  # four tiles per block, the last of 8 keys
    (1, 400, 400, 3, 1, 40, 65, False),  # a tile holding only the landmark, padded dim, MQA
    (1, 1100, 1100, 2, 1, 32, 256, False),
    (1, 2100, 2100, 1, 1, 64, 1000, False),  # 16 tiles per block, a partial third block
    (1, 900, 900, 4, 2, 64, 100, True),
    (2, 600, 700, 2, 1, 128, 128, True),
]


def low_precision_error(q, k, v, bs, idx, ref, dtype):
    """Error of the reference itself evaluated in `dtype` (inputs already rounded to it)."""
    low = landmark_attn_reference(
        q.detach().to(dtype), k.detach().to(dtype), v.detach().to(dtype),
        block_size=bs, block_indices=idx,
    )  # fmt: skip
    return rel_err(low, ref)


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "x".join(map(str, c)))
def test_cuda_vs_reference(case, dtype):
    B, Tq, Tk, Hq, Hkv, D, bs, retrieval = case
    q, k, v = make(B, Tq, Tk, Hq, Hkv, D, dtype=dtype, device="cuda")
    idx = retrieval_indices(B, Tq, Tk, Hkv, bs, 5).cuda() if retrieval else None
    (out, ref), *_ = vs_reference(q, k, v, bs, dtype, "cuda", idx)
    if dtype != F32:
        assert rel_err(out, ref) < 2.0 * low_precision_error(q, k, v, bs, idx, ref, dtype) + 1e-3


@cuda_only
@pytest.mark.parametrize("T,D,bs,grad", [(2048, 128, 64, True), (8192, 64, 51, False)])
def test_cuda_long(T, D, bs, grad):
    q, k, v = make(1, T, T, 1, 1, D, dtype=BF16, device="cuda")
    if grad:
        vs_reference(q, k, v, bs, BF16, "cuda")
        return
    out = landmark_attn(q, k, v, block_size=bs)
    ref = landmark_attn_reference(q.double(), k.double(), v.double(), block_size=bs)
    assert_close_to_ref("o", out, ref, BF16, "cuda")


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_large_logits(dtype):
    q, k, v = make(1, 200, 200, 2, 2, 64, dtype=F32, device="cuda")
    q, k, v = (q * 12).to(dtype), (k * 12).to(dtype), v.to(dtype)  # |s| up to ~1e3
    out = landmark_attn(q, k, v, block_size=16)
    ref = landmark_attn_reference(q.double(), k.double(), v.double(), block_size=16)
    assert_close_to_ref("o", out, ref, dtype, "cuda")


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_varlen(dtype):
    cu = torch.tensor([0, 70, 71, 71, 200, 333], dtype=torch.int32, device="cuda")
    q, k, v = make(1, 333, 333, 4, 2, 64, dtype=dtype, device="cuda")
    vs_reference(q, k, v, 51, dtype, "cuda", cu=cu)


@cuda_only
@pytest.mark.parametrize("bs", [64, 128])
def test_cuda_retrieval_all_blocks_equals_training_and_decode(bs):
    B, T, Hq, Hkv, D = 1, 1000, 8, 2, 128
    q, k, v = make(B, T, T, Hq, Hkv, D, dtype=BF16, device="cuda")
    nb = T // bs
    idx = landmark_topk_blocks(q, k, block_size=bs, topk=nb + 3)
    assert (idx[..., -3:] == -1).all()
    a = landmark_attn(q, k, v, block_size=bs, block_indices=idx)
    b = landmark_attn(q, k, v, block_size=bs)
    assert rel_err(a, b) < 1e-6
    # one-token retrieval decode: the last query against the whole cache
    qd = q[:, -1:]
    idx = landmark_topk_blocks(qd, k, block_size=bs, topk=4)
    ref_idx = landmark_topk_blocks_reference(qd.cpu(), k.cpu(), block_size=bs, topk=4)
    assert torch.equal(idx.cpu(), ref_idx)
    out = landmark_attn(qd, k, v, block_size=bs, block_indices=idx)
    ref = landmark_attn_reference(qd.double(), k.double(), v.double(), block_size=bs,
                                  block_indices=idx)  # fmt: skip
    assert_close_to_ref("decode", out, ref, BF16, "cuda")


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("bs", [100, 128])
def test_cuda_varlen_long_blocks(bs, dtype):
    """Sequences shorter than a block, of one block and a partial one, of several blocks."""
    cu = torch.tensor([0, 70, 71, 71, 200, 333, 933], dtype=torch.int32, device="cuda")
    grads_vs_reference(1, 933, 933, 4, 2, 64, bs, "cuda", cu=cu, dtype=dtype, tol=None)


@cuda_only
def test_cuda_topk_long_blocks():
    q, k, _ = make(2, 700, 900, 4, 2, 32, dtype=F32, device="cuda")
    got = landmark_topk_blocks(q, k, block_size=100, topk=3)
    ref = landmark_topk_blocks_reference(q.cpu(), k.cpu(), block_size=100, topk=3)
    assert torch.equal(got.cpu(), ref)


@cuda_only
def test_cuda_topk_ties_and_varlen():
    q, k, _ = make(2, 120, 120, 4, 2, 32, dtype=F32, device="cuda")
    k[:, 7::8] = k[:, 7:8]  # every landmark key equal: all scores tie -> lowest blocks win
    got = landmark_topk_blocks(q, k, block_size=8, topk=3)
    ref = landmark_topk_blocks_reference(q.cpu(), k.cpu(), block_size=8, topk=3)
    assert torch.equal(got.cpu(), ref)


@cuda_only
def test_cuda_deterministic_and_fully_written():
    q, k, v = make(1, 333, 333, 4, 2, 64, dtype=BF16, device="cuda", grad=True)
    outs = []
    for _ in range(2):
        out = landmark_attn(q, k, v, block_size=51)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        outs.append((out, *grads))
    for a, b in zip(*outs, strict=True):
        assert torch.equal(a, b)
    # poisoned outputs of the raw op are overwritten everywhere
    from longattn import _native
    from longattn._runtime import native_call

    o = poison_(torch.empty(1, 333, 4, 64, dtype=BF16, device="cuda"))
    o_lo = poison_(torch.empty_like(o))
    lse = poison_(torch.empty(1, 333, 4, device="cuda"))
    with native_call(q) as stream:
        _native.landmark_fwd(q.detach(), k.detach(), v.detach(), o, o_lo, lse, None, 51, 0.125,
                             None, stream)  # fmt: skip
    torch.cuda.synchronize()
    assert torch.isfinite(o).all() and torch.isfinite(o_lo).all() and torch.isfinite(lse).all()
    assert (o_lo.float().abs() <= o.float().abs() * 2**-8).all()  # a rounding residual


# The Hopper engine (sm_90a) and the sm_80 kernels at awkward sizes: rows not a multiple of the
# 128-row tile, tiles of 112 keys (block 51), GQA, Tk > Tq, retrieval, strided views.
ENGINE_CASES = [
    # B, Tq, Tk, Hq, Hkv, D, bs, retrieval
    (1, 1000, 1000, 4, 1, 128, 64, False),
    (2, 333, 500, 2, 2, 64, 51, False),
    (1, 700, 700, 4, 2, 128, 64, True),
    (1, 300, 300, 2, 2, 128, 32, False),
    (1, 129, 129, 2, 1, 64, 100, False),
]
ENGINE_BLOCKS = (16, 32, 51, 64, 128)  # the engine's compile-time block sizes


@cuda_only
@pytest.mark.parametrize(
    "force_sm80, pingpong",
    [(False, "0"), (False, "1"), (True, "0")],
    ids=["engine", "pingpong", "sm80"],
)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("case", ENGINE_CASES, ids=lambda c: "x".join(map(str, c)))
def test_cuda_engine_vs_reference(case, dtype, force_sm80, pingpong, monkeypatch):
    monkeypatch.setenv("LONGATTN_SM90_PINGPONG", pingpong)
    check_path = engine_path(monkeypatch, force_sm80)
    B, Tq, Tk, Hq, Hkv, D, bs, retrieval = case
    q, k, v = make(B, Tq, Tk, Hq, Hkv, D, dtype=dtype, device="cuda")
    idx = retrieval_indices(B, Tq, Tk, Hkv, bs, 5).cuda() if retrieval else None
    (out, ref), *_ = vs_reference(q, k, v, bs, dtype, "cuda", idx)
    check_path(bs in ENGINE_BLOCKS)  # other block sizes run the sm_80 kernels
    assert rel_err(out, ref) < 2.0 * low_precision_error(q, k, v, bs, idx, ref, dtype) + 1e-3


@cuda_only
@pytest.mark.parametrize("force_sm80", [False, True], ids=["engine", "sm80"])
def test_cuda_engine_strided_varlen_large_logits(force_sm80, monkeypatch):
    """Views into wider tensors (TMA strides), empty and one-token sequences, |s| ~ 1e3."""
    check_path = engine_path(monkeypatch, force_sm80)
    cu = torch.tensor([0, 70, 71, 71, 200, 333], dtype=torch.int32, device="cuda")
    wide = torch.randn(1, 333, 3, 4, 128, dtype=F64, device="cuda")
    q, k, v = (wide[:, :, i, :, :64].to(BF16) for i in range(3))
    q = q * 12
    k = k * 12
    out = landmark_attn(q, k, v, block_size=51, cu_seqlens=cu)
    check_path()
    ref = landmark_attn_reference(q.double(), k.double(), v.double(), block_size=51, cu_seqlens=cu)
    assert_close_to_ref("o", out, ref, BF16, "cuda")
