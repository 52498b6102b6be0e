"""Property-based tests (hypothesis): every CPU op against its float64 reference.

Random batch sizes (0 where the op allows it), lengths (0 and 1 included), heads and GQA ratios,
odd head dims, block / chunk / window sizes, float64 and float32, strided ``[B, H, T, D]``
views (``.transpose(1, 2)``) and stride-0 expanded heads, packed batches with empty and
one-token sequences. Forward within 1e-10 (float64) / 1e-4 (float32) relative error; float64
gradients against the reference's autograd.

Budget: ``LONGATTN_HYPOTHESIS_EXAMPLES`` examples per test (default 15), derandomized so CI
is reproducible; raise it for a soak run, e.g. ``LONGATTN_HYPOTHESIS_EXAMPLES=500``.
"""

from __future__ import annotations

import os

import longattn as la
import pytest
import torch
from conftest import rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from longattn.reference import landmark as RL
from longattn.reference import lightning as RLi
from longattn.reference import nsa as RN
from longattn.reference import rat as RR

F64, F32 = torch.float64, torch.float32
TOL = {F64: 1e-10, F32: 1e-4}
EXAMPLES = int(os.environ.get("LONGATTN_HYPOTHESIS_EXAMPLES", "15"))

prop = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

dtypes = st.sampled_from([F64, F32])
layouts = st.sampled_from(["contig", "transposed", "expanded"])


# ----------------------------------------------------------------------------- helpers


class Gen:
    """Tensors from one torch.Generator seeded by hypothesis (reproducible shrinking)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def randn(self, *shape, dtype=F64, mag=1.0):
        return (torch.randn(*shape, generator=self.g, dtype=F64) * mag).to(dtype)

    def rand(self, *shape, dtype=F64):
        return torch.rand(*shape, generator=self.g, dtype=F64).to(dtype)

    def bhtd(self, B, T, H, D, dtype, layout, mag=1.0):
        """A ``[B, T, H, D]`` tensor in the given layout plus its leaf (for gradients)."""
        if layout == "transposed":
            leaf = self.randn(B, H, T, D, dtype=dtype, mag=mag).requires_grad_()
            return leaf.transpose(1, 2), leaf
        if layout == "expanded":
            leaf = self.randn(B, T, 1, D, dtype=dtype, mag=mag).requires_grad_()
            return leaf.expand(B, T, H, D), leaf
        leaf = self.randn(B, T, H, D, dtype=dtype, mag=mag).requires_grad_()
        return leaf, leaf


@st.composite
def seq_setup(draw, allow_b0=True, max_t=12):
    """(B, T, cu_seqlens or None): dense batches (B may be 0, T may be 0 or 1) or a packed
    batch of 1..4 sequences with lengths 0..6 (empty and one-token sequences included)."""
    if draw(st.booleans()):
        lengths = draw(st.lists(st.integers(0, 6), min_size=1, max_size=4))
        cu_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(cu_dtype)
        return 1, int(cu[-1]), cu
    B = draw(st.integers(0 if allow_b0 else 1, 3))
    T = draw(st.sampled_from([0, 1, 2, 3]) | st.integers(0, max_t))
    return B, T, None


head_dims = st.sampled_from([1, 2, 3, 5, 8, 16, 17])


def assert_close(out, ref, dtype, what="out"):
    assert out.shape == ref.shape, f"{what}: {tuple(out.shape)} vs {tuple(ref.shape)}"
    # equal non-finite patterns (e.g. −inf lse rows), then a relative error on the rest
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin), f"{what}: non-finite pattern differs"
    assert torch.equal(out[~fin], ref.to(out.dtype)[~fin]), f"{what}: non-finite values differ"
    err = rel_err(out[fin], ref[fin])
    assert err <= TOL[dtype], f"{what}: rel err {err:.3e} > {TOL[dtype]:.0e}"


def grads(out, leaves, w):
    ts = [t for t in leaves if t is not None]
    gs = torch.autograd.grad((out * w).sum(), ts, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(ts, gs, strict=True)]


def check_grads(out, ref, leaves, gen):
    """float64 only: d(sum(w·out)) against the reference's autograd, for every leaf."""
    if out.numel() == 0:
        return
    w = gen.randn(*out.shape, dtype=out.dtype)
    for i, (a, b) in enumerate(zip(grads(out, leaves, w), grads(ref, leaves, w), strict=True)):
        assert_close(a, b, F64, f"grad[{i}]")


def as64(*ts):
    return [None if t is None else t.detach().double() for t in ts]


# ----------------------------------------------------------------------------- lightning


@prop
@given(st.data())
def test_lightning(data):
    B, T, cu = data.draw(seq_setup())
    dtype = data.draw(dtypes)
    H = data.draw(st.integers(1, 3))
    D, E = data.draw(head_dims), data.draw(head_dims)
    gen = Gen(data.draw(st.integers(0, 2**31)))
    q, ql = gen.bhtd(B, T, H, D, dtype, data.draw(layouts), mag=0.5)
    k, kl = gen.bhtd(B, T, H, D, dtype, data.draw(layouts), mag=0.5)
    v, vl = gen.bhtd(B, T, H, E, dtype, data.draw(layouts))
    slopes = (gen.rand(H) * 2).to(dtype).requires_grad_()
    n = B if cu is None else cu.numel() - 1
    s0 = None
    if data.draw(st.booleans()):
        sdt = F64 if dtype == F64 else F32
        s0 = gen.randn(n, H, D, E, dtype=sdt, mag=0.3).requires_grad_()
    scale = data.draw(st.sampled_from([1.0, D**-0.5]))
    out, fs = la.lightning_attn(
        q, k, v, slopes, scale=scale, initial_state=s0, output_final_state=True, cu_seqlens=cu
    )
    if dtype == F64:
        ref, rfs = RLi.lightning_attn_recurrent(q, k, v, slopes, scale, s0, cu)
    else:
        q6, k6, v6, sl6, s06 = as64(q, k, v, slopes, s0)
        ref, rfs = RLi.lightning_attn_recurrent(q6, k6, v6, sl6, scale, s06, cu)
    assert_close(out, ref, dtype)
    assert_close(fs, rfs, dtype, "final_state")
    if dtype == F64:
        check_grads(out, ref, [ql, kl, vl, slopes, s0], gen)


# ----------------------------------------------------------------------------- rat


@prop
@given(st.data())
def test_rat(data):
    B, T, cu = data.draw(seq_setup())
    dtype = data.draw(dtypes)
    H = data.draw(st.integers(1, 3))
    D = data.draw(head_dims)
    L = data.draw(st.integers(1, 6))
    rope = data.draw(st.sampled_from([None, 10000.0, 7.0])) if D % 2 == 0 else None
    gen = Gen(data.draw(st.integers(0, 2**31)))
    q, ql = gen.bhtd(B, T, H, D, dtype, data.draw(layouts))
    k, kl = gen.bhtd(B, T, H, D, dtype, data.draw(layouts))
    v, vl = gen.bhtd(B, T, H, D, dtype, data.draw(layouts))
    gdt = data.draw(st.sampled_from([dtype, F32]))
    gl = torch.sigmoid(gen.randn(B, T, H, D)).to(gdt).requires_grad_()
    out = la.rat_attn(q, k, v, gl, chunk_size=L, rope_base=rope, cu_seqlens=cu)
    if dtype == F64 and gdt == F64:
        ref = RR.rat_attn_reference(q, k, v, gl, chunk_size=L, rope_base=rope, cu_seqlens=cu)
        assert_close(out, ref, dtype)
        check_grads(out, ref, [ql, kl, vl, gl], gen)
    else:
        ref = RR.rat_attn_reference(*as64(q, k, v, gl), chunk_size=L, rope_base=rope, cu_seqlens=cu)
        assert_close(out, ref, dtype)


# ----------------------------------------------------------------------------- landmark


@st.composite
def gqa_heads(draw):
    hkv = draw(st.integers(1, 3))
    return hkv * draw(st.integers(1, 3)), hkv


@prop
@given(st.data())
def test_landmark_attn(data):
    B, T, cu = data.draw(seq_setup())
    Tk = T
    if cu is None and data.draw(st.booleans()):
        Tk = T + data.draw(st.integers(0, 5))  # queries at the end of a longer key sequence
    dtype = data.draw(dtypes)
    Hq, Hkv = data.draw(gqa_heads())
    D, E = data.draw(head_dims), data.draw(head_dims)
    bs = data.draw(st.integers(2, 5))
    gen = Gen(data.draw(st.integers(0, 2**31)))
    q, ql = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    k, kl = gen.bhtd(B, Tk, Hkv, D, dtype, data.draw(layouts))
    v, vl = gen.bhtd(B, Tk, Hkv, E, dtype, data.draw(layouts))
    idx = None
    if data.draw(st.booleans()):
        n = data.draw(st.integers(1, 3))
        nb = Tk // bs + 2
        idx = torch.randint(-1, nb + 1, (B, T, Hkv, n), generator=gen.g, dtype=torch.int32)
    out = la.landmark_attn(q, k, v, block_size=bs, cu_seqlens=cu, block_indices=idx)
    if dtype == F64:
        ref = RL.landmark_attn_reference(q, k, v, block_size=bs, cu_seqlens=cu, block_indices=idx)
        assert_close(out, ref, dtype)
        check_grads(out, ref, [ql, kl, vl], gen)
    else:
        ref = RL.landmark_attn_reference(
            *as64(q, k, v), block_size=bs, cu_seqlens=cu, block_indices=idx
        )
        assert_close(out, ref, dtype)


@prop
@given(st.data())
def test_landmark_topk_blocks(data):
    # float64 only: the reference ranks in float64, float32 near-ties could rank differently
    B, T, cu = data.draw(seq_setup(max_t=16))
    Tk = T + (data.draw(st.integers(0, 5)) if cu is None else 0)
    Hq, Hkv = data.draw(gqa_heads())
    D = data.draw(head_dims)
    bs = data.draw(st.integers(2, 4))
    topk = data.draw(st.integers(1, 4))
    gen = Gen(data.draw(st.integers(0, 2**31)))
    q, _ = gen.bhtd(B, T, Hq, D, F64, data.draw(layouts))
    k, _ = gen.bhtd(B, Tk, Hkv, D, F64, data.draw(layouts))
    out = la.landmark_topk_blocks(q, k, block_size=bs, topk=topk, cu_seqlens=cu)
    ref = RL.landmark_topk_blocks_reference(q, k, block_size=bs, topk=topk, cu_seqlens=cu)
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------- nsa


@prop
@given(st.data())
def test_nsa_compress(data):
    B, T, cu = data.draw(seq_setup())
    dtype = data.draw(dtypes)
    H, D = data.draw(st.integers(1, 3)), data.draw(head_dims)
    ks = data.draw(st.integers(1, 5))
    stride = data.draw(st.integers(1, ks))
    gen = Gen(data.draw(st.integers(0, 2**31)))
    x, xl = gen.bhtd(B, T, H, D, dtype, data.draw(layouts))
    weight = pe = None
    if data.draw(st.booleans()):
        d_out = data.draw(head_dims)
        weight = gen.randn(H, ks * D, d_out, dtype=dtype, mag=0.3).requires_grad_()
        if data.draw(st.booleans()):
            pe = gen.randn(H, ks, D, dtype=dtype).requires_grad_()
    out, cu_cmp = la.nsa_compress(
        x, kernel_size=ks, kernel_stride=stride, weight=weight, pe=pe, cu_seqlens=cu
    )
    args = [x, weight, pe] if dtype == F64 else as64(x, weight, pe)
    ref, ref_cu = RN.nsa_compress_reference(
        args[0], kernel_size=ks, kernel_stride=stride, weight=args[1], pe=args[2], cu_seqlens=cu
    )
    assert_close(out, ref, dtype)
    if cu is not None:
        assert torch.equal(cu_cmp, ref_cu)
    if dtype == F64:
        check_grads(out, ref, [xl, weight, pe], gen)


@st.composite
def cmp_setup(draw, need_divisible=False):
    ks = draw(st.integers(1, 4))
    if need_divisible:
        stride = draw(st.sampled_from([d for d in range(1, ks + 1) if ks % d == 0]))
        bs = stride * draw(st.integers(1, 3))
    else:
        stride = draw(st.integers(1, ks))
        bs = None
    return ks, stride, bs


def compressed_kv(gen, B, T, cu, ks, stride, Hkv, D, E, dtype, lk, lv):
    """k_cmp / v_cmp with the row count the ops expect (compressed from random data)."""
    if cu is None:
        C = RN.nsa_num_windows(T, ks, stride)
    else:
        lengths = (cu[1:] - cu[:-1]).tolist()
        C = sum(RN.nsa_num_windows(int(n), ks, stride) for n in lengths)
    kc, kcl = gen.bhtd(B, C, Hkv, D, dtype, lk)
    vc, vcl = gen.bhtd(B, C, Hkv, E, dtype, lv)
    return kc, kcl, vc, vcl


@prop
@given(st.data())
def test_nsa_compressed_attn(data):
    B, T, cu = data.draw(seq_setup())
    dtype = data.draw(dtypes)
    Hq, Hkv = data.draw(gqa_heads())
    D, E = data.draw(head_dims), data.draw(head_dims)
    ks, stride, _ = data.draw(cmp_setup())
    gen = Gen(data.draw(st.integers(0, 2**31)))
    q, ql = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    kc, kcl, vc, vcl = compressed_kv(
        gen, B, T, cu, ks, stride, Hkv, D, E, dtype, data.draw(layouts), data.draw(layouts)
    )
    out, lse = la.nsa_compressed_attn(
        q, kc, vc, kernel_size=ks, kernel_stride=stride, cu_seqlens=cu
    )
    args = [q, kc, vc] if dtype == F64 else as64(q, kc, vc)
    ref, rlse = RN.nsa_compressed_attn_reference(
        *args, kernel_size=ks, kernel_stride=stride, cu_seqlens=cu
    )
    assert_close(out, ref, dtype)
    assert_close(lse, rlse, dtype, "lse")
    if dtype == F64:
        check_grads(out, ref, [ql, kcl, vcl], gen)


@prop
@given(st.data())
def test_nsa_topk_blocks(data):
    # float64 only (exact block ranking)
    B, T, cu = data.draw(seq_setup(max_t=16))
    Hq, Hkv = data.draw(gqa_heads())
    D = data.draw(head_dims)
    ks, stride, bs = data.draw(cmp_setup(need_divisible=True))
    topk = data.draw(st.integers(1, 4))
    init, local = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))
    gen = Gen(data.draw(st.integers(0, 2**31)))
    q, _ = gen.bhtd(B, T, Hq, D, F64, data.draw(layouts))
    kc, _, vc, _ = compressed_kv(gen, B, T, cu, ks, stride, Hkv, D, 1, F64, "contig", "contig")
    _, lse = la.nsa_compressed_attn(q, kc, vc, kernel_size=ks, kernel_stride=stride, cu_seqlens=cu)
    kw = dict(
        kernel_size=ks, kernel_stride=stride, block_size=bs, topk=topk, init_blocks=init,
        local_blocks=local, cu_seqlens=cu,
    )  # fmt: skip
    out = la.nsa_topk_blocks(q, kc, lse, **kw)
    ref = RN.nsa_topk_blocks_reference(q.detach(), kc.detach(), lse, **kw)
    assert torch.equal(out, ref)


def selected_indices(gen, B, T, Hkv, n, bs, idx_dtype):
    """Distinct visible blocks per row, −1 padded, with some skipped out-of-range entries."""
    out = torch.full((B, T, Hkv, n), -1, dtype=idx_dtype)
    g = gen.g
    for b in range(B):
        for t in range(T):
            for h in range(Hkv):
                # local position unknown with cu_seqlens: draw among a superset, the op and the
                # reference both skip blocks beyond t // bs
                cand = torch.randperm(T // bs + 3, generator=g)[:n]
                out[b, t, h, : cand.numel()] = cand.to(idx_dtype)
                if int(torch.randint(0, 3, (), generator=g)) == 0:
                    out[b, t, h, -1] = -1 if n > 1 else out[b, t, h, -1]
    return out


@prop
@given(st.data())
def test_nsa_selected_attn(data):
    B, T, cu = data.draw(seq_setup())
    dtype = data.draw(dtypes)
    Hq, Hkv = data.draw(gqa_heads())
    D, E = data.draw(head_dims), data.draw(head_dims)
    bs = data.draw(st.integers(1, 5))
    n = data.draw(st.integers(1, 3))
    gen = Gen(data.draw(st.integers(0, 2**31)))
    q, ql = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    k, kl = gen.bhtd(B, T, Hkv, D, dtype, data.draw(layouts))
    v, vl = gen.bhtd(B, T, Hkv, E, dtype, data.draw(layouts))
    idx = selected_indices(
        gen, B, T, Hkv, n, bs, data.draw(st.sampled_from([torch.int32, torch.int64]))
    )
    counts_kind = data.draw(st.sampled_from(["none", "int", "tensor"]))
    counts = None
    if counts_kind == "int":
        counts = data.draw(st.integers(0, n))
    elif counts_kind == "tensor":
        counts = torch.randint(0, n + 1, (B, T, Hkv), generator=gen.g, dtype=torch.int32)
    out, lse = la.nsa_selected_attn(
        q, k, v, idx, block_size=bs, block_counts=counts, cu_seqlens=cu, return_lse=True
    )
    args = [q, k, v] if dtype == F64 else as64(q, k, v)
    ref, rlse = RN.nsa_selected_attn_reference(
        *args, idx, block_size=bs, block_counts=counts, cu_seqlens=cu, return_lse=True
    )
    assert_close(out, ref, dtype)
    assert_close(lse, rlse, dtype, "lse")
    if dtype == F64:
        check_grads(out, ref, [ql, kl, vl], gen)


@prop
@given(st.data())
def test_sliding_window_attn(data):
    B, T, cu = data.draw(seq_setup())
    dtype = data.draw(dtypes)
    Hq, Hkv = data.draw(gqa_heads())
    D, E = data.draw(head_dims), data.draw(head_dims)
    W = data.draw(st.integers(1, 8))
    gen = Gen(data.draw(st.integers(0, 2**31)))
    q, ql = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts), mag=data.draw(st.sampled_from([1, 8])))
    k, kl = gen.bhtd(B, T, Hkv, D, dtype, data.draw(layouts))
    v, vl = gen.bhtd(B, T, Hkv, E, dtype, data.draw(layouts))
    out = la.sliding_window_attn(q, k, v, window_size=W, cu_seqlens=cu)
    args = [q, k, v] if dtype == F64 else as64(q, k, v)
    ref = RN.sliding_window_attn_reference(*args, window_size=W, cu_seqlens=cu)
    assert_close(out, ref, dtype)
    if dtype == F64:
        check_grads(out, ref, [ql, kl, vl], gen)


@prop
@given(st.data())
def test_nsa_attn(data):
    # float64 (selection through nsa_topk_blocks must rank exactly like the reference); float32
    # with given block_indices
    B, T, cu = data.draw(seq_setup())
    dtype = data.draw(dtypes)
    Hq, Hkv = data.draw(gqa_heads())
    D = data.draw(head_dims)
    ks, stride, bs = data.draw(cmp_setup(need_divisible=True))
    topk, W = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    gen = Gen(data.draw(st.integers(0, 2**31)))
    q, ql = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    k, kl = gen.bhtd(B, T, Hkv, D, dtype, data.draw(layouts))
    v, vl = gen.bhtd(B, T, Hkv, D, dtype, data.draw(layouts))
    kc, kcl, vc, vcl = compressed_kv(
        gen, B, T, cu, ks, stride, Hkv, D, D, dtype, "contig", "contig"
    )
    gates = [torch.sigmoid(gen.randn(B, T, Hq)).to(dtype).requires_grad_() for _ in range(3)]
    idx = None
    if dtype == F32 or data.draw(st.booleans()):
        idx = selected_indices(gen, B, T, Hkv, topk, bs, torch.int32)
    kw = dict(
        kernel_size=ks, kernel_stride=stride, block_size=bs, topk=topk, window_size=W,
        cu_seqlens=cu, block_indices=idx,
    )  # fmt: skip
    out = la.nsa_attn(q, k, v, *gates, k_cmp=kc, v_cmp=vc, **kw)
    if dtype == F64:
        ref = RN.nsa_attn_reference(q, k, v, *gates, k_cmp=kc, v_cmp=vc, **kw)
        assert_close(out, ref, dtype)
        check_grads(out, ref, [ql, kl, vl, kcl, vcl, *gates], gen)
    else:
        q6, k6, v6, kc6, vc6, *g6 = as64(q, k, v, kc, vc, *gates)
        ref = RN.nsa_attn_reference(q6, k6, v6, *g6, k_cmp=kc6, v_cmp=vc6, **kw)
        assert_close(out, ref, dtype)


def test_empty_batch_references_and_ops():
    """Regression: the landmark, rat and NSA references crashed (torch.stack of nothing) for
    B = 0 with T > 0; the ops return empty outputs of the right shape."""
    q = torch.randn(0, 3, 2, 4, dtype=F64)
    g = torch.sigmoid(q)
    assert RR.rat_attn_reference(q, q, q, g, chunk_size=2).shape == (0, 3, 2, 4)
    assert la.rat_attn(q, q, q, g, chunk_size=2).shape == (0, 3, 2, 4)
    assert RL.landmark_attn_reference(q, q, q, block_size=2).shape == (0, 3, 2, 4)
    assert la.landmark_attn(q, q, q, block_size=2).shape == (0, 3, 2, 4)
    assert RN.sliding_window_attn_reference(q, q, q, window_size=2).shape == (0, 3, 2, 4)
    assert la.sliding_window_attn(q, q, q, window_size=2).shape == (0, 3, 2, 4)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_float32_inputs_keep_dtype(dtype):
    """Spot check outside hypothesis: outputs keep the input dtype for every op."""
    q = torch.randn(1, 5, 2, 4, dtype=dtype)
    assert la.sliding_window_attn(q, q, q, window_size=2).dtype == dtype
    assert la.rat_attn(q, q, q, torch.sigmoid(q), chunk_size=2).dtype == dtype
    assert la.landmark_attn(q, q, q, block_size=2).dtype == dtype
    assert la.lightning_attn(q, q, q, torch.ones(2, dtype=dtype))[0].dtype == dtype
