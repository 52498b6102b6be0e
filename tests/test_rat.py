"""longattn rat_attn against the float64 per-token reference (docs/api/rat.md).

Tolerances: tests/harness.py (the float64 reference, norm-wise and element-wise), except float32
gradients on CUDA: within 1e-4 (``CUDA_GRAD_TOL_F32``).
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import (
    BF16,
    DEVICES,
    F16,
    F32,
    F64,
    assert_close_to_ref,
    check_fwd_bwd,
    cuda_only,
)
from longattn.ops.rat import rat_attn, rat_attn_with_states, rat_fwd
from longattn.reference.rat import rat_attn_chunked, rat_attn_reference, rat_rope

# float32 gradients on CUDA (3xTF32 products through the chunk scan's backward): looser than
# harness.TOL's 5e-5. The CPU kernels keep the table's 1e-5 (3e-7 measured).
CUDA_GRAD_TOL_F32 = 1e-4
QKVG = ["y", "dq", "dk", "dv", "dg"]


def make(B, T, H, D, dtype=F32, device="cpu", g_dtype=None, requires_grad=False):
    q, k, v = (torch.randn(B, T, H, D, device=device).to(dtype) for _ in range(3))
    g = torch.sigmoid(torch.randn(B, T, H, D, device=device) + 1.0).to(g_dtype or dtype)
    for t in (q, k, v, g):
        t.requires_grad_(requires_grad)
    return q, k, v, g


def ref64(q, k, v, g, **kw):
    return rat_attn_reference(q.double(), k.double(), v.double(), g.double(), **kw)


def check(name, out, ref, dtype, device="cpu"):
    """An output against the float64 reference (harness.TOL)."""
    assert_close_to_ref(name, out, ref, dtype, device)


def vs_reference(q, k, v, g, dtype, device, ref=rat_attn_reference, **kw):
    """rat_attn(q, k, v, g, **kw) on ``device``: output and gradients against ``ref`` in float64
    on the same device."""
    grad_tol = CUDA_GRAD_TOL_F32 if dtype == F32 and device != "cpu" else None
    return check_fwd_bwd(
        lambda *a: rat_attn(*a, **kw), (q, k, v, g), dtype, device,
        ref_fn=lambda *a: ref(*a, **kw), ref_device=device, names=QKVG, grad_tol=grad_tol,
    )  # fmt: skip


def scan(x, g, L):
    """In-chunk states of [B, T, H, D] in float64 (per-token loop)."""
    h = torch.zeros_like(x[:, 0], dtype=F64)
    out = []
    for t in range(x.shape[1]):
        if t % L == 0:
            h = torch.zeros_like(h)
        h = g[:, t].double() * h + (1 - g[:, t].double()) * x[:, t].double()
        out.append(h)
    return torch.stack(out, dim=1)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("L", [1, 3, 4, 10])
@pytest.mark.parametrize("rope_theta", [10000.0, 7.0, None])
def test_gradcheck_float64(L, rope_theta):
    """T = 10 is not a multiple of 3 or 4; L = T is the pure gated RNN."""
    q, k, v, g = make(1, 10, 2, 4, F64, requires_grad=True)

    def f(q, k, v, g):
        return rat_attn(q, k, v, g, chunk_size=L, rope_theta=rope_theta, scale=0.7)

    assert torch.autograd.gradcheck(f, (q, k, v, g))


def test_gradcheck_float64_varlen_and_expanded_keys():
    q, _, v, g = make(1, 13, 4, 4, F64, requires_grad=True)
    k1 = torch.randn(1, 13, 1, 4, dtype=F64, requires_grad=True)
    cu = torch.tensor([0, 5, 5, 13], dtype=torch.int32)

    def f(q, k1, v, g):
        k = k1.expand(1, 13, 4, 4)  # stride-0 grouped keys
        return rat_attn(q, k, v, g, chunk_size=3, cu_seqlens=cu)

    assert torch.autograd.gradcheck(f, (q, k1, v, g))


# ----------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("L", [1, 16, 64])
def test_forward_backward_vs_reference(device, dtype, D, L):
    B, T, H = 1, 80 if L < 64 else 150, 2
    q, k, v, g = make(B, T, H, D, dtype, device, g_dtype=F32)
    vs_reference(q, k, v, g, dtype, device, chunk_size=L)


def peaked_queries(k, g, L, gap=8.0, base=10000.0):
    """q of magnitude 8 (logits ~8σ) plus, from chunk 1 on, a multiple of the previous chunk's
    final state (in the rotated frame) that puts its logit `gap` above every other logit of the
    row (earlier chunk states and the own state): nearly one-hot attention on a chunk state."""
    B, T, H, D = k.shape
    c = torch.arange(T) // L
    kr = rat_rope(scan(k, g, L), c, base)  # own states, rotated by their chunk
    qr = 8 * torch.randn(B, T, H, D, dtype=F64)  # rotated queries
    s = D**-0.5
    finals = kr[:, L - 1 :: L]  # [B, C, H, D] full chunks' final states
    prev = s * torch.einsum("bthd,bjhd->bthj", qr, finals)
    j = torch.arange(finals.shape[1])
    target = (c - 1).clamp(min=0)
    others = (j[None, :] < c[:, None]) & (j[None, :] != target[:, None])  # [T, C]
    top_prev = prev.masked_fill(~others[None, :, None, :], -math.inf).amax(-1)
    top_other = torch.maximum(top_prev, s * (qr * kr).sum(-1))
    kt = finals[:, target]
    beta = (top_other + gap - s * (qr * kt).sum(-1)) / (s * (kt * kt).sum(-1))
    qr = qr + torch.where(c[None, :, None] > 0, beta, 0.0)[..., None] * kt
    return rat_rope(qr, -c, base)  # un-rotated


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("T,L", [(2, 1), (150, 4), (150, 16), (150, 100)], ids=str)
def test_peaked_attention_grads(T, L, dtype, device):
    """Nearly one-hot attention on a chunk state: dA = P (dy·V~ − Δ) is tiny, so Δ from the
    16-bit y alone is off by its rounding (dq, dk ~1.5 eps off); Δ from y + y_lo is accurate.
    k and v are one head expanded over four (stride 0)."""
    k1, v1 = (torch.randn(1, T, 1, 32, dtype=F64).to(dtype) for _ in range(2))
    g = torch.sigmoid(torch.randn(1, T, 4, 32) + 1.0)
    q = peaked_queries(k1.double().expand(1, T, 4, 32), g, L).to(dtype)

    def run(f):
        return lambda q, k1, v1, g: f(
            q, k1.expand(1, T, 4, 32), v1.expand(1, T, 4, 32), g, chunk_size=L
        )

    # CUDA also rounds the scanned values and chunk states to 16 bits for its tensor-core
    # products (H200: dq up to 1.5e-2 in bf16, 1.9e-3 in f16; without y_lo the CPU kernel is
    # 2.8e-2..0.7 and 3.4e-3..)
    tol = torch.finfo(dtype).eps * (1 if device == "cpu" else 3)
    check_fwd_bwd(
        run(rat_attn), (q, k1, v1, g), dtype, device, ref_fn=run(rat_attn_reference),
        names=QKVG, grad_tol=tol,
    )  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("L", [4, 16])
def test_chunk0_rows_are_the_gated_state(device, L):
    """In chunk 0 a query only sees its own state: y_t = v~_t."""
    dtype, tol = (F64, 1e-12) if device == "cpu" else (F32, 1e-5)  # CUDA has no float64
    q, k, v, g = make(2, 3 * L + 1, 3, 8, dtype, device)
    y = rat_attn(q, k, v, g, chunk_size=L)
    want = scan(v, g, L)[:, :L].to(y.dtype)
    torch.testing.assert_close(y[:, :L], want, rtol=tol, atol=tol)


def test_chunk_size_at_least_T_is_the_gated_rnn():
    q, k, v, g = make(1, 20, 2, 8, F64)
    for L in (20, 64):
        y = rat_attn(q, k, v, g, chunk_size=L)
        torch.testing.assert_close(y, scan(v, g, 10**9), rtol=1e-12, atol=1e-12)


def test_chunk_size_one_is_softmax_attention_over_gated_keys():
    q, k, v, g = make(1, 17, 2, 8, F64)
    kk, vv = (1 - g) * k, (1 - g) * v
    s = 8**-0.5
    scores = torch.einsum("bthd,bjhd->bhtj", q, kk) * s
    scores = scores.masked_fill(torch.ones(17, 17).triu(1).bool(), float("-inf"))
    want = torch.einsum("bhtj,bjhd->bthd", scores.softmax(-1), vv)
    y = rat_attn(q, k, v, g, chunk_size=1, rope_theta=None)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_varlen_equals_separate_calls(device, idx_dtype):
    lens = [5, 0, 23, 40, 1]
    T, L = sum(lens), 16
    q, k, v, g = make(1, T, 2, 64, F32, device)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=idx_dtype, device=device)
    y = rat_attn(q, k, v, g, chunk_size=L, cu_seqlens=cu)
    check("y", y, ref64(q, k, v, g, chunk_size=L, cu_seqlens=cu), F32, device)
    a = 0
    for n in lens:
        if n:
            sl = slice(a, a + n)
            one = rat_attn(q[:, sl], k[:, sl], v[:, sl], g[:, sl], chunk_size=L)
            torch.testing.assert_close(y[:, sl], one, rtol=1e-6, atol=1e-6)
        a += n


def test_varlen_gradients_vs_reference():
    lens = [7, 30, 12]
    cu = torch.tensor([0, 7, 37, 49])
    q, k, v, g = make(1, sum(lens), 2, 16, F32)
    vs_reference(q, k, v, g, F32, "cpu", chunk_size=8, cu_seqlens=cu)


def test_strided_inputs_and_g_in_input_dtype():
    """Transposed [B, H, T, D] views and stride-0 heads need no copy; bf16 g is accepted."""
    B, T, H, D = 2, 40, 4, 32
    qt = torch.randn(B, H, T, D).to(BF16)
    k1 = torch.randn(B, T, 1, D).to(BF16)
    v = torch.randn(B, T, H, D).to(BF16)
    g = torch.sigmoid(torch.randn(B, T, H, D)).to(BF16)
    q, k = qt.transpose(1, 2), k1.expand(B, T, H, D)
    y = rat_attn(q, k, v, g, chunk_size=8)
    check("y", y, ref64(q, k, v, g, chunk_size=8), BF16)


def test_chunk_final_states_at_offset_L_minus_1():
    B, T, H, D, L = 2, 23, 2, 8, 5
    q, k, v, g = make(B, T, H, D, F64)
    _, lse, ks, vs = rat_attn_with_states(q, k, v, g, chunk_size=L)
    sk, sv = scan(k, g, L), scan(v, g, L)
    assert ks.shape == (B, 5, H, D)
    ends = [min(j * L + L - 1, T - 1) for j in range(5)]  # last slot: running state
    torch.testing.assert_close(ks, sk[:, ends], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vs, sv[:, ends], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ks[:, 1], sk[:, L])  # not the first offset of the next chunk
    _, lse_r = rat_attn_reference(q, k, v, g, chunk_size=L, return_lse=True)
    torch.testing.assert_close(lse, lse_r, rtol=1e-12, atol=1e-12)


def test_chunked_eager_formulation_matches_reference():
    q, k, v, g = make(2, 45, 2, 16, F64)
    torch.testing.assert_close(
        rat_attn_chunked(q, k, v, g, chunk_size=8), ref64(q, k, v, g, chunk_size=8)
    )


def test_large_scores_do_not_overflow():
    q, k, v, g = make(1, 64, 2, 16, F32)
    y = rat_attn(q * 30, k * 30, v, g, chunk_size=4)
    check("y", y, ref64(q * 30, k * 30, v, g, chunk_size=4), F32)


def test_opcheck():
    q, k, v, g = make(1, 12, 2, 8, F32, requires_grad=True)
    torch.library.opcheck(rat_fwd, (q, k, v, g, 4, 0.5, 10000.0, None))
    q, k, v = (x.detach().to(BF16).requires_grad_() for x in (q, k, v))
    # with y's rounding residual
    torch.library.opcheck(rat_fwd, (q, k, v, g, 4, 0.5, 10000.0, None, True))


# ----------------------------------------------------------------------------- errors


def _expect(exc, match, fn):
    with pytest.raises(exc, match=match):
        fn()


def test_bad_inputs_name_the_argument():
    q, k, v, g = make(1, 8, 2, 8, F32)
    _expect(ValueError, "q: expected rank 4", lambda: rat_attn(q[0], k, v, g))
    _expect(ValueError, "k: expected shape", lambda: rat_attn(q, k[:, :4], v, g))
    _expect(ValueError, "g: expected shape", lambda: rat_attn(q, k, v, g[..., :4]))
    _expect(TypeError, "v: expected dtype float32", lambda: rat_attn(q, k, v.double(), g))
    _expect(TypeError, "g: expected dtype float32", lambda: rat_attn(q, k, v, g.to(BF16)))
    _expect(TypeError, "q: expected dtype", lambda: rat_attn(*(t.int() for t in (q, k, v)), g))
    _expect(
        ValueError, "chunk_size: must be at least 1", lambda: rat_attn(q, k, v, g, chunk_size=0)
    )
    _expect(ValueError, "rope_theta", lambda: rat_attn(q, k, v, g, rope_theta=-1.0))
    q5, k5, v5, g5 = make(1, 8, 2, 5, F32)
    _expect(ValueError, "even head dim", lambda: rat_attn(q5, k5, v5, g5))
    rat_attn(q5, k5, v5, g5, rope_theta=None)  # odd D is fine without RoPE
    bad_cu = torch.tensor([0, 6, 3, 8], dtype=torch.int32)
    _expect(ValueError, "cu_seqlens", lambda: rat_attn(q, k, v, g, cu_seqlens=bad_cu))
    short_cu = torch.tensor([0, 5], dtype=torch.int32)
    _expect(ValueError, "cu_seqlens", lambda: rat_attn(q, k, v, g, cu_seqlens=short_cu))
    _expect(
        ValueError,
        "cu_seqlens: packed sequences need batch size 1",
        lambda: rat_attn(*make(2, 8, 2, 8, F32), cu_seqlens=torch.tensor([0, 8])),
    )


# ----------------------------------------------------------------------------- CUDA


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("L", [1, 16, 64, 300])
def test_cuda_vs_reference(dtype, D, L):
    """T = 200 is not a multiple of 16 or 64; L = 300 >= T is the gated RNN (L > 64 path)."""
    B, T, H = 2, 200, 2
    q, k, v, g = make(B, T, H, D, dtype, "cuda", g_dtype=F32)
    vs_reference(q, k, v, g, dtype, "cuda", chunk_size=L)


@cuda_only
@pytest.mark.parametrize("L", [3, 48, 100, 130])
@pytest.mark.parametrize("rope_theta", [10000.0, None])
def test_cuda_awkward_chunks_and_odd_sizes(L, rope_theta):
    """Chunks that do not divide the 64-token tile, several sub-tiles per chunk (L > 64), D = 40."""
    B, T, H, D = 1, 333, 3, 40
    q, k, v, g = make(B, T, H, D, F32, "cuda")
    vs_reference(q, k, v, g, F32, "cuda", chunk_size=L, rope_theta=rope_theta)


@cuda_only
def test_cuda_states_and_lse():
    B, T, H, D, L = 2, 77, 2, 64, 16
    q, k, v, g = make(B, T, H, D, F32, "cuda")
    y, lse, ks, vs = rat_attn_with_states(q, k, v, g, chunk_size=L)
    y_c, lse_c, ks_c, vs_c = rat_attn_with_states(*(t.cpu() for t in (q, k, v, g)), chunk_size=L)
    for name, a, b in (("y", y, y_c), ("lse", lse, lse_c), ("ks", ks, ks_c), ("vs", vs, vs_c)):
        check(name, a, b, F32, "cuda")  # against the CPU kernel's float32


@cuda_only
def test_cuda_chunk0_rows_and_large_logits():
    q, k, v, g = make(2, 90, 2, 64, F32, "cuda")
    y = rat_attn(q, k, v, g, chunk_size=32)
    torch.testing.assert_close(y[:, :32], scan(v, g, 32)[:, :32].float(), rtol=1e-5, atol=1e-5)
    y = rat_attn(q * 30, k * 30, v, g, chunk_size=4)
    check("y", y, ref64(q * 30, k * 30, v, g, chunk_size=4), F32, "cuda")


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_cuda_varlen_with_grads(dtype, idx_dtype):
    lens = [5, 0, 23, 140, 1, 64]
    T, L = sum(lens), 16
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=idx_dtype, device="cuda")
    q, k, v, g = make(1, T, 2, 64, dtype, "cuda", g_dtype=F32)
    vs_reference(q, k, v, g, dtype, "cuda", chunk_size=L, cu_seqlens=cu)


@cuda_only
@pytest.mark.parametrize("L", [16, 100])
def test_cuda_varlen_long_chunks(L):
    lens = [70, 250, 3]
    cu = torch.tensor([0, 70, 320, 323], dtype=torch.int32, device="cuda")
    q, k, v, g = make(1, sum(lens), 2, 32, F32, "cuda")
    vs_reference(q, k, v, g, F32, "cuda", chunk_size=L, cu_seqlens=cu)


@cuda_only
def test_cuda_grouped_keys_stride0_and_transposed_q():
    B, T, H, D, L = 2, 150, 4, 64, 16
    qt = torch.randn(B, H, T, D, device="cuda", dtype=BF16)
    k1 = torch.randn(B, T, 1, D, device="cuda", dtype=BF16)
    v = torch.randn(B, T, H, D, device="cuda", dtype=BF16)
    g = torch.sigmoid(torch.randn(B, T, H, D, device="cuda"))
    written = []

    def run(f):
        def call(qt, k1, v, g):
            if f is rat_attn:
                written.append(k1)
            return f(qt.transpose(1, 2), k1.expand(B, T, H, D), v, g, chunk_size=L)

        return call

    check_fwd_bwd(
        run(rat_attn), (qt, k1, v, g), BF16, "cuda", ref_fn=run(rat_attn_reference),
        ref_device="cuda", names=QKVG,
    )  # fmt: skip
    assert torch.equal(written[0].detach(), k1)  # never written through the expanded view


@cuda_only
def test_cuda_g_in_input_dtype_and_head_dim_256():
    q, k, v, g = make(1, 100, 2, 256, BF16, "cuda")
    pairs = vs_reference(q, k, v, g, BF16, "cuda", chunk_size=16)
    assert pairs[4][0].dtype == BF16  # dg


@cuda_only
def test_cuda_larger_T_bf16():
    q, k, v, g = make(1, 2048, 2, 128, BF16, "cuda", g_dtype=F32)
    vs_reference(q, k, v, g, BF16, "cuda", ref=rat_attn_chunked, chunk_size=16)


@cuda_only
def test_cuda_empty_and_errors():
    q, k, v, g = make(2, 0, 2, 64, BF16, "cuda")
    assert rat_attn(q, k, v, g).shape == (2, 0, 2, 64)
    q, k, v, g = make(1, 8, 2, 256, F32, "cuda")
    _expect(ValueError, "head dim 256 is not supported", lambda: rat_attn(q, k, v, g))
    q, k, v, g = make(1, 8, 2, 8, F64, "cuda")
    _expect(TypeError, "q: expected dtype", lambda: rat_attn(q, k, v, g))


@cuda_only
def test_cuda_opcheck():
    q, k, v, g = make(1, 40, 2, 16, F32, "cuda", requires_grad=True)
    torch.library.opcheck(rat_fwd, (q, k, v, g, 8, 0.5, 10000.0, None))
    q, k, v = (x.detach().to(BF16).requires_grad_() for x in (q, k, v))
    torch.library.opcheck(rat_fwd, (q, k, v, g, 8, 0.5, 10000.0, None, True))  # with y_lo
