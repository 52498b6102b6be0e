"""landmark_attn against the float64 reference (specs/landmark.md, "Tests the op must pass")."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import rel_err
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

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
I32, I64 = torch.int32, torch.int64
CUDA_SKIP = "CUDA kernels for landmark_attn are not implemented yet"


def skip_cuda(device):
    if device != "cpu":
        pytest.skip(CUDA_SKIP)


def make(B, Tq, Tk, Hq, Hkv, D, dtype=F64, device="cpu", E=None, grad=False):
    q = torch.randn(B, Tq, Hq, D, device=device).to(dtype)
    k = torch.randn(B, Tk, Hkv, D, device=device).to(dtype)
    v = torch.randn(B, Tk, Hkv, E or D, device=device).to(dtype)
    return [x.requires_grad_(grad) for x in (q, k, v)]


def naive_loops(q, k, v, bs, scale):
    """The spec's formulas, one query at a time (B = 1, Hq = Hkv = 1)."""
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
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "x".join(map(str, c)))
def test_gradcheck(case, device):
    skip_cuda(device)
    B, Tq, Tk, Hq, Hkv, D, bs = case
    q, k, v = make(B, Tq, Tk, Hq, Hkv, D, grad=True)
    torch.autograd.gradcheck(
        lambda q, k, v: landmark_attn(q, k, v, block_size=bs), (q, k, v), atol=1e-8
    )


def retrieval_indices(B, Tq, Tk, Hkv, bs, n, gen=None):
    nb = Tk // bs + 1
    return torch.randint(-1, nb + 1, (B, Tq, Hkv, n), dtype=torch.int32, generator=gen)


def test_gradcheck_retrieval(device):
    skip_cuda(device)
    B, Tq, Tk, Hq, Hkv, D, bs = 1, 21, 29, 4, 2, 5, 4
    q, k, v = make(B, Tq, Tk, Hq, Hkv, D, grad=True)
    idx = retrieval_indices(B, Tq, Tk, Hkv, bs, 3)
    torch.autograd.gradcheck(
        lambda q, k, v: landmark_attn(q, k, v, block_size=bs, block_indices=idx),
        (q, k, v),
        atol=1e-8,
    )


def test_gradcheck_varlen(device):
    skip_cuda(device)
    q, k, v = make(1, 30, 30, 2, 1, 4, grad=True)
    cu = torch.tensor([0, 7, 7, 19, 30], dtype=torch.int32)
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
    skip_cuda(device)
    B, Tq, Tk, Hq, Hkv, D, bs = case
    q, k, v = make(B, Tq, Tk, Hq, Hkv, D, dtype=dtype, device=device, grad=True)
    idx = retrieval_indices(B, Tq, Tk, Hkv, bs, 4) if retrieval else None
    out = landmark_attn(q, k, v, block_size=bs, block_indices=idx)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = landmark_attn_reference(q64, k64, v64, block_size=bs, block_indices=idx)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), go.double())
    tol = 2e-5 if dtype == F32 else 2e-2
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol
    for name, g, r in zip("qkv", grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert rel_err(g, r) < tol * (1 if dtype == F32 else 1.5), name


def test_weights_sum_to_one_and_landmarks_zero(device):
    """V = identity: o_i is row i of the weight matrix."""
    skip_cuda(device)
    bs, T = 6, 40
    q = torch.randn(1, T, 1, 8, dtype=F64)
    k = torch.randn(1, T, 1, 8, dtype=F64)
    v = torch.eye(T, dtype=F64)[None, :, None, :]
    w = landmark_attn(q, k, v, block_size=bs)[0, :, 0]  # [T, T]
    assert torch.allclose(w.sum(-1), torch.ones(T, dtype=F64), atol=1e-12)
    landmark_cols = torch.arange(bs - 1, T, bs)
    assert (w[:, landmark_cols] == 0).all()
    assert torch.triu(w, diagonal=1).abs().max() == 0  # causal
    assert torch.allclose(w[0], v[0, :, 0, :][0])  # query 0 attends to itself only
    ref = landmark_weights_reference(q, k, block_size=bs)[0][0]
    assert rel_err(w, ref) < 1e-12
    # landmark row: its block's ordinary tokens directly, no self-attention
    row = bs - 1
    assert w[row, row] == 0 and torch.allclose(w[row, :row].sum(), torch.tensor(1.0, dtype=F64))
    # first token after a landmark: gate of block 0 plus itself
    assert w[bs, bs] > 0 and w[bs, : bs - 1].sum() > 0


def test_topk_covering_all_blocks_equals_training(device):
    skip_cuda(device)
    B, T, Hq, Hkv, D, bs = 2, 90, 4, 2, 16, 8
    q, k, v = make(B, T, T, Hq, Hkv, D, dtype=F32)
    n_blocks = T // bs
    idx = landmark_topk_blocks(q, k, block_size=bs, topk=n_blocks + 2)
    a = landmark_attn(q, k, v, block_size=bs, block_indices=idx)
    b = landmark_attn(q, k, v, block_size=bs)
    assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
def test_topk_vs_reference(dtype, device):
    skip_cuda(device)
    q, k, _ = make(1, 70, 100, 4, 2, 16, dtype=dtype)
    got = landmark_topk_blocks(q, k, block_size=8, topk=3)
    ref = landmark_topk_blocks_reference(q, k, block_size=8, topk=3)
    assert got.dtype == torch.int32 and torch.equal(got, ref)
    cu = torch.tensor([0, 30, 70], dtype=torch.int64)
    got = landmark_topk_blocks(q, k[:, :70], block_size=5, topk=2, cu_seqlens=cu)
    ref = landmark_topk_blocks_reference(q, k[:, :70], block_size=5, topk=2, cu_seqlens=cu)
    assert torch.equal(got, ref)


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
    assert torch.equal(remove_landmarks(out, 4), ids)


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
        (dict(block_indices=torch.zeros(1, 8, 2, 2, dtype=I64)), TypeError, "block_indices"),
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


def test_cuda_inputs_raise():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    q = torch.randn(1, 8, 2, 4, device="cuda")
    with pytest.raises(NotImplementedError, match="not implemented"):
        landmark_attn(q, q, q)


def test_opcheck():
    q, k, v = make(1, 12, 12, 2, 1, 4, dtype=F64, grad=True)
    idx = retrieval_indices(1, 12, 12, 1, 4, 2)
    torch.library.opcheck(torch.ops.longattn.landmark_fwd, (q, k, v, idx, 4, 0.5, None))
