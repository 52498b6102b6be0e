"""The property cases shared by tests/test_properties.py (CPU, float64/float32) and
tests/test_properties_device.py (CUDA in float32/bfloat16/float16, and the same harness on CPU).

A case draws one problem with hypothesis (``st.data()``) for a :class:`Target` (the device, the
dtypes, the size ranges), runs the op there, and compares with the float64 reference computed on
the CPU from the same rounded inputs: outputs, and the gradients of ``sum(w·out)`` for the
target's gradient dtypes. Non-finite reference values (−inf lse rows) must be matched exactly,
and every other value must be finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import longattn as la
import torch
from harness import BF16, F16, F32, F64, assert_close_to_ref
from hypothesis import strategies as st
from longattn.reference import landmark as RL
from longattn.reference import lightning as RLi
from longattn.reference import nsa as RN
from longattn.reference import rat as RR
from test_nsa_selection import topk_fast

# The property suites' override of harness.TOL (looser: random sizes down to a single element,
# degenerate rows, GQA up to 16), relative error by input dtype on every device. float32 runs
# 3xTF32 tensor cores on CUDA (float32-accurate; harness.TOL: 1e-5 for outputs, 5e-5 for
# gradients); bfloat16/float16 round P and the carried states to the input precision
# (harness.TOL: 2e-2). The element-wise bound of the harness applies on top.
TOL = {F64: 1e-10, F32: 1e-4, BF16: 3e-2, F16: 3e-2}
# float32 gradients that cancel by construction: lightning's slope gradient (terms ~T times the
# result) and dq/dk where softmax rows are nearly one-hot (q magnitude 8: any rounding is
# amplified by 1/(1 − P)). 3xTF32 products carry ~2^-21 relative error; the H200 showed 2.0e-4
# (slopes, T 78) and 6.1e-4 (window dq).
ILL_CONDITIONED_F32 = 1e-3


@dataclass(frozen=True)
class Target:
    """Where and how a property case runs."""

    device: str
    dtypes: tuple[torch.dtype, ...]
    # dtypes whose gradients are compared with the reference's autograd
    grad_dtypes: tuple[torch.dtype, ...]
    # wide: also draw the sizes the CUDA kernels tile by (T around 64 and 128 up to max_t, head
    # dims up to the op's CUDA limit, chunks/blocks/windows around 64, larger GQA groups)
    wide: bool = False
    max_t: int = 12

    def put(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(self.device)

    def sizes(self, small, wide_values, cap=None):
        """``small`` (a strategy), plus ``wide_values`` (at most ``cap``) on a wide target."""
        extra = [x for x in wide_values if cap is None or x <= cap]
        return small | st.sampled_from(extra) if self.wide and extra else small

    def head_dim(self, cap=256):
        return self.sizes(st.sampled_from([1, 2, 3, 5, 8, 16, 17]), WIDE_HEAD_DIMS, cap)


WIDE_HEAD_DIMS = [24, 32, 40, 64, 80, 100, 128, 160, 256]


# ----------------------------------------------------------------------------- inputs


class Arg(NamedTuple):
    """One differentiable input: the op's view (on the target device, in the drawn dtype) and
    the reference's view (CPU float64, the same rounded values), each with its leaf."""

    x: torch.Tensor
    leaf: torch.Tensor
    ref: torch.Tensor
    ref_leaf: torch.Tensor


def make_arg(values, dtype, device, view=None):
    rounded = values.to(dtype)
    leaf = rounded.to(device, copy=True).requires_grad_()
    ref_leaf = rounded.to(F64, copy=True).requires_grad_()
    view = view or (lambda t: t)
    return Arg(view(leaf), leaf, view(ref_leaf), ref_leaf)


class Gen:
    """Tensors from one torch.Generator seeded by hypothesis (reproducible shrinking)."""

    def __init__(self, seed: int, device: str = "cpu"):
        self.g = torch.Generator().manual_seed(seed)
        self.device = device

    def randn(self, *shape, mag=1.0):
        return torch.randn(*shape, generator=self.g, dtype=F64) * mag

    def rand(self, *shape):
        return torch.rand(*shape, generator=self.g, dtype=F64)

    def arg(self, values, dtype):
        return make_arg(values, dtype, self.device)

    def bhtd(self, B, T, H, D, dtype, layout, mag=1.0) -> Arg:
        """A ``[B, T, H, D]`` input: contiguous, a ``[B, H, T, D]`` leaf transposed, or a
        ``[B, T, 1, D]`` leaf expanded over the heads (stride 0)."""
        if layout == "transposed":
            return make_arg(self.randn(B, H, T, D, mag=mag), dtype, self.device,
                            lambda t: t.transpose(1, 2))  # fmt: skip
        if layout == "expanded":
            return make_arg(self.randn(B, T, 1, D, mag=mag), dtype, self.device,
                            lambda t: t.expand(B, T, H, D))  # fmt: skip
        return make_arg(self.randn(B, T, H, D, mag=mag), dtype, self.device)


layouts = st.sampled_from(["contig", "transposed", "expanded"])


@st.composite
def seq_setup(draw, tgt: Target, allow_b0=True, max_t=12):
    """(B, T, cu_seqlens or None): dense batches (B may be 0, T may be 0 or 1) or a packed
    batch of 1..4 sequences (empty and one-token sequences included). Wide targets also draw
    T and sequence lengths across the 64- and 128-token tiles, up to ``tgt.max_t``."""
    big = [t for t in (63, 64, 65, 127, 128, 129) if t <= tgt.max_t]
    if draw(st.booleans()):
        length = tgt.sizes(st.integers(0, 6), [0, 1, 63, 64, 65, tgt.max_t // 4])
        lengths = draw(st.lists(length, min_size=1, max_size=4))
        cu_dtype = draw(st.sampled_from([torch.int32, torch.int64]))
        cu = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(cu_dtype)
        return 1, int(cu[-1]), cu
    B = draw(st.integers(0 if allow_b0 else 1, 3))
    T = st.sampled_from([0, 1, 2, 3]) | st.integers(0, max_t)
    if tgt.wide:
        T = T | st.sampled_from(big) | st.integers(0, tgt.max_t)
    return B, draw(T), None


@st.composite
def gqa_heads(draw, tgt: Target):
    """(Hq, Hkv); wide targets add the CUDA group-size regimes (KV-outer up to G = 8)."""
    hkv = draw(st.integers(1, 3))
    if tgt.wide and draw(st.booleans()):
        return 2 * draw(st.sampled_from([4, 8, 9, 16])), 2
    return hkv * draw(st.integers(1, 3)), hkv


def state_dtype(dtype):
    return F64 if dtype == F64 else F32


# ----------------------------------------------------------------------------- checks


def assert_close(out, ref, dtype, what="out", tol=None):
    """harness.assert_close_to_ref within ``tol`` (default TOL[dtype]): same shape, the
    reference's non-finite values exactly (−inf lse rows), finite values elsewhere, norm-wise
    and element-wise close on the rest."""
    tol = TOL[dtype] if tol is None else tol
    assert_close_to_ref(what, out, ref, dtype, out.device.type, tol=tol)


def check_grads(pairs, args, gen, dtype, tgt, tol_dtype=None, ill_conditioned=()):
    """d(Σ w·out) of the op against the reference's autograd for every Arg in ``args`` (None
    entries skipped), when ``dtype`` is one of the target's gradient dtypes; within
    TOL[tol_dtype] (default: dtype's), in float32 ILL_CONDITIONED_F32 for the Args in
    ``ill_conditioned``."""
    args = [a for a in args if a is not None]
    # outputs that depend on no input (empty, or a zero final state) have nothing to compare
    pairs = [(o, r) for o, r in pairs if r.numel() > 0 and r.requires_grad]
    if dtype not in tgt.grad_dtypes or not pairs:
        return
    loss = ref_loss = 0
    for out, ref in pairs:
        w = gen.randn(*ref.shape)
        loss = loss + (out.double() * w.to(out.device)).sum()
        ref_loss = ref_loss + (ref * w).sum()
    got = torch.autograd.grad(loss, [a.leaf for a in args], allow_unused=True)
    want = torch.autograd.grad(ref_loss, [a.ref_leaf for a in args], allow_unused=True)
    for i, (a, g, r) in enumerate(zip(args, got, want, strict=True)):
        g = torch.zeros_like(a.leaf) if g is None else g
        r = torch.zeros_like(a.ref_leaf) if r is None else r
        loose = dtype == F32 and any(a is b for b in ill_conditioned)
        tol = ILL_CONDITIONED_F32 if loose else None
        assert_close(g, r, tol_dtype or dtype, f"grad[{i}]", tol)


def refs(*args):
    return [None if a is None else a.ref for a in args]


# ----------------------------------------------------------------------------- lightning


def lightning(data, tgt: Target):
    B, T, cu = data.draw(seq_setup(tgt))
    dtype = data.draw(st.sampled_from(tgt.dtypes))
    H = data.draw(st.integers(1, 3))
    D, E = data.draw(tgt.head_dim()), data.draw(tgt.head_dim())
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    q = gen.bhtd(B, T, H, D, dtype, data.draw(layouts), mag=0.5)
    k = gen.bhtd(B, T, H, D, dtype, data.draw(layouts), mag=0.5)
    v = gen.bhtd(B, T, H, E, dtype, data.draw(layouts))
    # slopes and states stay float32 with 16-bit inputs (as in the modules)
    slopes = gen.arg(gen.rand(H) * 2, state_dtype(dtype) if dtype in (BF16, F16) else dtype)
    n = B if cu is None else cu.numel() - 1
    s0 = None
    if data.draw(st.booleans()):
        s0 = gen.arg(gen.randn(n, H, D, E, mag=0.3), state_dtype(dtype))
    scale = data.draw(st.sampled_from([1.0, D**-0.5]))
    # fixed slopes keep a 16-bit backward on the 16-bit kernels (learned ones run it in float32)
    learned = data.draw(st.booleans())
    out, fs = la.lightning_attn(
        q.x, k.x, v.x, slopes.x if learned else slopes.x.detach(), scale=scale,
        initial_state=None if s0 is None else s0.x, output_final_state=True,
        cu_seqlens=tgt.put(cu),
    )  # fmt: skip
    ref, rfs = RLi.lightning_attn_recurrent(*refs(q, k, v, slopes), scale, *refs(s0), cu)
    assert_close(out, ref, dtype)
    assert_close(fs, rfs, dtype, "final_state")
    check_grads(
        [(out, ref), (fs, rfs)], [q, k, v, slopes if learned else None, s0], gen, dtype, tgt,
        ill_conditioned=[slopes],
    )  # fmt: skip


# ----------------------------------------------------------------------------- rat


def coarser(a, b):
    """The dtype with the looser tolerance (mixed-precision inputs)."""
    return a if TOL[a] >= TOL[b] else b


def rat(data, tgt: Target):
    B, T, cu = data.draw(seq_setup(tgt))
    dtype = data.draw(st.sampled_from(tgt.dtypes))
    H = data.draw(st.integers(1, 3))
    D = data.draw(tgt.head_dim(128 if dtype == F32 else 256))  # CUDA: float32 up to 128
    L = data.draw(tgt.sizes(st.integers(1, 6), [16, 63, 64, 65, 100]))
    rope = data.draw(st.sampled_from([None, 10000.0, 7.0])) if D % 2 == 0 else None
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    q = gen.bhtd(B, T, H, D, dtype, data.draw(layouts))
    k = gen.bhtd(B, T, H, D, dtype, data.draw(layouts))
    v = gen.bhtd(B, T, H, D, dtype, data.draw(layouts))
    gdt = data.draw(st.sampled_from([dtype, F32]))
    g = gen.arg(torch.sigmoid(gen.randn(B, T, H, D)), gdt)
    out = la.rat_attn(q.x, k.x, v.x, g.x, chunk_size=L, rope_theta=rope, cu_seqlens=tgt.put(cu))
    ref = RR.rat_attn_reference(*refs(q, k, v, g), chunk_size=L, rope_theta=rope, cu_seqlens=cu)
    assert_close(out, ref, dtype)
    check_grads([(out, ref)], [q, k, v, g], gen, dtype, tgt, coarser(dtype, gdt))


# ----------------------------------------------------------------------------- landmark


def landmark_attn(data, tgt: Target):
    B, T, cu = data.draw(seq_setup(tgt))
    Tk = T
    if cu is None and data.draw(st.booleans()):
        Tk = T + data.draw(st.integers(0, 5))  # queries at the end of a longer key sequence
    dtype = data.draw(st.sampled_from(tgt.dtypes))
    Hq, Hkv = data.draw(gqa_heads(tgt))
    D, E = data.draw(tgt.head_dim(128)), data.draw(tgt.head_dim(128))  # CUDA: up to 128
    bs = data.draw(tgt.sizes(st.integers(2, 5), [8, 16, 33, 51, 64]))  # CUDA: up to 64
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    q = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    k = gen.bhtd(B, Tk, Hkv, D, dtype, data.draw(layouts))
    v = gen.bhtd(B, Tk, Hkv, E, dtype, data.draw(layouts))
    idx = None
    if data.draw(st.booleans()):
        n = data.draw(st.integers(1, 3))
        nb = Tk // bs + 2
        idx = torch.randint(-1, nb + 1, (B, T, Hkv, n), generator=gen.g, dtype=torch.int32)
    out = la.landmark_attn(
        q.x, k.x, v.x, block_size=bs, cu_seqlens=tgt.put(cu), block_indices=tgt.put(idx)
    )
    ref = RL.landmark_attn_reference(
        *refs(q, k, v), block_size=bs, cu_seqlens=cu, block_indices=idx
    )
    assert_close(out, ref, dtype)
    check_grads([(out, ref)], [q, k, v], gen, dtype, tgt)


def landmark_topk_blocks(data, tgt: Target):
    # exact: the kernels rank by float64 landmark scores like the reference (float64 only on
    # the CPU target, where the suite has always compared it)
    B, T, cu = data.draw(seq_setup(tgt, max_t=16))
    Tk = T + (data.draw(st.integers(0, 5)) if cu is None else 0)
    dtype = F64 if F64 in tgt.dtypes else data.draw(st.sampled_from(tgt.dtypes))
    Hq, Hkv = data.draw(gqa_heads(tgt))
    D = data.draw(tgt.head_dim(128))
    bs = data.draw(tgt.sizes(st.integers(2, 4), [8, 64]))
    topk = data.draw(st.integers(1, 4))
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    q = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    k = gen.bhtd(B, Tk, Hkv, D, dtype, data.draw(layouts))
    out = la.landmark_topk_blocks(q.x, k.x, block_size=bs, topk=topk, cu_seqlens=tgt.put(cu))
    ref = RL.landmark_topk_blocks_reference(q.ref, k.ref, block_size=bs, topk=topk, cu_seqlens=cu)
    assert torch.equal(out.cpu(), ref)


# ----------------------------------------------------------------------------- nsa


def nsa_compress(data, tgt: Target):
    B, T, cu = data.draw(seq_setup(tgt))
    dtype = data.draw(st.sampled_from(tgt.dtypes))
    H, D = data.draw(st.integers(1, 3)), data.draw(tgt.head_dim())
    ks = data.draw(tgt.sizes(st.integers(1, 5), [16, 32]))
    stride = data.draw(st.integers(1, ks))
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    x = gen.bhtd(B, T, H, D, dtype, data.draw(layouts))
    weight = pe = None
    if data.draw(st.booleans()):
        d_out = data.draw(tgt.head_dim())
        weight = gen.arg(gen.randn(H, ks * D, d_out, mag=0.3), dtype)
        if data.draw(st.booleans()):
            pe = gen.arg(gen.randn(H, ks, D), dtype)
    out, cu_cmp = la.nsa_compress(
        x.x, kernel_size=ks, kernel_stride=stride, weight=None if weight is None else weight.x,
        pe=None if pe is None else pe.x, cu_seqlens=tgt.put(cu),
    )  # fmt: skip
    ref, ref_cu = RN.nsa_compress_reference(
        x.ref, kernel_size=ks, kernel_stride=stride, weight=refs(weight)[0], pe=refs(pe)[0],
        cu_seqlens=cu,
    )  # fmt: skip
    assert_close(out, ref, dtype)
    if cu is not None:
        assert torch.equal(cu_cmp.cpu(), ref_cu)
    check_grads([(out, ref)], [x, weight, pe], gen, dtype, tgt)


@st.composite
def cmp_setup(draw, tgt: Target, need_divisible=False):
    ks = draw(tgt.sizes(st.integers(1, 4), [8, 16, 32]))
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
    return gen.bhtd(B, C, Hkv, D, dtype, lk), gen.bhtd(B, C, Hkv, E, dtype, lv)


# float64 NSA branch references: the dense masked formulation per sequence (vectorised, fast at
# T = 300; the per-token references loop over tokens in Python).


def _branch_ref(q, k, v, cu, keys_of, mask_of, no_keys=None):
    """(o, lse) per packed sequence (or the whole batch): dense softmax over mask_of(start, n,
    m) for a sequence of n queries and its m = keys_of(n) keys (taken in order from k, v);
    ``no_keys(q, k, v)`` for sequences without keys."""
    B, T, Hq = q.shape[:3]
    if B * T == 0:
        return q.new_zeros(B, T, Hq, v.shape[3]), q.new_zeros(B, T, Hq)
    lengths = [T] if cu is None else (cu[1:] - cu[:-1]).tolist()
    parts, s, c = [], 0, 0
    for n in lengths:
        m = keys_of(n)
        qs, ks, vs = q[:, s : s + n], k[:, c : c + m], v[:, c : c + m]
        if n > 0 and m == 0:
            parts.append(no_keys(qs, ks, vs))
        elif n > 0:
            mask = mask_of(s, n, m).expand(B, k.shape[2], n, m)
            parts.append(RN.nsa_dense_masked_attn(qs, ks, vs, mask))
        s, c = s + n, c + m
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


def compressed_ref(q, kc, vc, ks, stride, cu):
    return _branch_ref(
        q, kc, vc, cu,
        lambda n: kc.shape[1] if cu is None else RN.nsa_num_windows(n, ks, stride),
        lambda s, n, m: RN.compressed_visibility_mask(n, m, ks, stride),
        lambda q, k, v: RN.nsa_compressed_attn_reference(
            q, k, v, kernel_size=ks, kernel_stride=stride
        ),
    )  # fmt: skip


def selected_ref(q, k, v, idx, bs, counts, cu):
    def mask(s, n, m):
        cnt = counts[:, s : s + n] if isinstance(counts, torch.Tensor) else counts
        return RN.nsa_selection_mask(idx[:, s : s + n], bs, n, cnt)

    return _branch_ref(q, k, v, cu, lambda n: n, mask)


def window_ref(q, k, v, W, cu):
    return _branch_ref(q, k, v, cu, lambda n: n, lambda s, n, m: RN.sliding_window_mask(n, W))[0]


def nsa_attn_ref(q, k, v, gates, kc, vc, ks, stride, bs, topk, W, cu, idx):
    """nsa_attn_reference's combination over the branch references above."""
    o_cmp, lse = compressed_ref(q, kc, vc, ks, stride, cu)
    if idx is None:
        idx = RN.nsa_topk_blocks_reference(
            q, kc, lse, kernel_size=ks, kernel_stride=stride, block_size=bs, topk=topk,
            cu_seqlens=cu,
        )  # fmt: skip
    o_slc = selected_ref(q, k, v, idx, bs, None, cu)[0]
    o_swa = window_ref(q, k, v, W, cu)
    g_cmp, g_slc, g_swa = (g[..., None] for g in gates)
    return g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa


def nsa_compressed_attn(data, tgt: Target):
    B, T, cu = data.draw(seq_setup(tgt))
    dtype = data.draw(st.sampled_from(tgt.dtypes))
    Hq, Hkv = data.draw(gqa_heads(tgt))
    D, E = data.draw(tgt.head_dim(128)), data.draw(tgt.head_dim(128))  # CUDA: up to 128
    ks, stride, _ = data.draw(cmp_setup(tgt))
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    q = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    kc, vc = compressed_kv(
        gen, B, T, cu, ks, stride, Hkv, D, E, dtype, data.draw(layouts), data.draw(layouts)
    )
    out, lse = la.nsa_compressed_attn(
        q.x,
        kc.x,
        vc.x,
        kernel_size=ks,
        kernel_stride=stride,
        cu_seqlens=tgt.put(cu),
        return_lse=True,
    )
    ref, rlse = compressed_ref(*refs(q, kc, vc), ks, stride, cu)
    assert_close(out, ref, dtype)
    assert_close(lse, rlse, dtype, "lse")
    check_grads([(out, ref)], [q, kc, vc], gen, dtype, tgt)


def nsa_topk_blocks(data, tgt: Target):
    # float64: exactly the reference's ranking. Other dtypes: rows whose n-th and (n+1)-th
    # float64 block scores are within 1e-4 (relative) may rank differently (topk_fast's ties).
    B, T, cu = data.draw(seq_setup(tgt, max_t=16))
    dtype = F64 if F64 in tgt.dtypes else data.draw(st.sampled_from(tgt.dtypes))
    Hq, Hkv = data.draw(gqa_heads(tgt))
    D = data.draw(tgt.head_dim(128))  # the lse comes from nsa_compressed_attn (CUDA: D ≤ 128)
    ks, stride, bs = data.draw(cmp_setup(tgt, need_divisible=True))
    topk = data.draw(st.integers(1, 4))
    init, local = data.draw(st.integers(0, 2)), data.draw(st.integers(0, 2))
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    q = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    kc, vc = compressed_kv(gen, B, T, cu, ks, stride, Hkv, D, 1, dtype, "contig", "contig")
    with torch.no_grad():
        _, lse = la.nsa_compressed_attn(
            q.x,
            kc.x,
            vc.x,
            kernel_size=ks,
            kernel_stride=stride,
            cu_seqlens=tgt.put(cu),
            return_lse=True,
        )
        kw = dict(
            kernel_size=ks, kernel_stride=stride, block_size=bs, topk=topk, init_blocks=init,
            local_blocks=local,
        )  # fmt: skip
        out = la.nsa_topk_blocks(q.x, kc.x, lse, cu_seqlens=tgt.put(cu), **kw).cpu()
        lse64 = lse.cpu().double()
        if dtype == F64:
            ref = RN.nsa_topk_blocks_reference(q.ref, kc.ref, lse64, cu_seqlens=cu, **kw)
            assert torch.equal(out, ref)
            return
        want, tie = topk_fast(q.ref, kc.ref, lse64, ks, stride, bs, topk, init, local, D**-0.5, cu)
    assert out.shape == want.shape and out.dtype == torch.int32
    bad = (out != want).any(-1) & ~tie
    assert not bad.any(), f"{int(bad.sum())} rows differ, first at {bad.nonzero()[0].tolist()}"


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


def nsa_selected_attn(data, tgt: Target):
    B, T, cu = data.draw(seq_setup(tgt))
    dtype = data.draw(st.sampled_from(tgt.dtypes))
    Hq, Hkv = data.draw(gqa_heads(tgt))
    D, E = data.draw(tgt.head_dim(128)), data.draw(tgt.head_dim(128))  # CUDA: up to 128
    bs = data.draw(tgt.sizes(st.integers(1, 5), [16, 32, 64, 100]))
    n = data.draw(st.integers(1, 3))
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    q = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    k = gen.bhtd(B, T, Hkv, D, dtype, data.draw(layouts))
    v = gen.bhtd(B, T, Hkv, E, dtype, data.draw(layouts))
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
        q.x, k.x, v.x, tgt.put(idx), block_size=bs,
        block_counts=tgt.put(counts) if counts_kind == "tensor" else counts,
        cu_seqlens=tgt.put(cu), return_lse=True,
    )  # fmt: skip
    ref, rlse = selected_ref(*refs(q, k, v), idx, bs, counts, cu)
    assert_close(out, ref, dtype)
    assert_close(lse, rlse, dtype, "lse")
    check_grads([(out, ref)], [q, k, v], gen, dtype, tgt)


def sliding_window_attn(data, tgt: Target):
    B, T, cu = data.draw(seq_setup(tgt))
    dtype = data.draw(st.sampled_from(tgt.dtypes))
    Hq, Hkv = data.draw(gqa_heads(tgt))
    D, E = data.draw(tgt.head_dim(128)), data.draw(tgt.head_dim(128))  # CUDA: up to 128
    W = data.draw(tgt.sizes(st.integers(1, 8), [63, 64, 65, 200]))
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    mag = data.draw(st.sampled_from([1, 8]))
    q = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts), mag=mag)
    k = gen.bhtd(B, T, Hkv, D, dtype, data.draw(layouts))
    v = gen.bhtd(B, T, Hkv, E, dtype, data.draw(layouts))
    out = la.sliding_window_attn(q.x, k.x, v.x, window_size=W, cu_seqlens=tgt.put(cu))
    ref = window_ref(*refs(q, k, v), W, cu)
    assert_close(out, ref, dtype)
    check_grads(
        [(out, ref)], [q, k, v], gen, dtype, tgt, ill_conditioned=[q, k] if mag == 8 else []
    )


def nsa_attn(data, tgt: Target):
    # The selection is computed by the op unless block_indices is drawn. float64: the reference
    # selects too (it must rank exactly alike); other dtypes: the reference gets the op's own
    # selection (nsa_topk_blocks on the target; near-ties may rank differently from float64).
    B, T, cu = data.draw(seq_setup(tgt))
    dtype = data.draw(st.sampled_from(tgt.dtypes))
    Hq, Hkv = data.draw(gqa_heads(tgt))
    D = data.draw(tgt.head_dim(128))  # CUDA: up to 128
    ks, stride, bs = data.draw(cmp_setup(tgt, need_divisible=True))
    topk = data.draw(st.integers(1, 3))
    W = data.draw(tgt.sizes(st.integers(1, 6), [64, 65]))
    gen = Gen(data.draw(st.integers(0, 2**31)), tgt.device)
    q = gen.bhtd(B, T, Hq, D, dtype, data.draw(layouts))
    k = gen.bhtd(B, T, Hkv, D, dtype, data.draw(layouts))
    v = gen.bhtd(B, T, Hkv, D, dtype, data.draw(layouts))
    kc, vc = compressed_kv(gen, B, T, cu, ks, stride, Hkv, D, D, dtype, "contig", "contig")
    gates = [gen.arg(torch.sigmoid(gen.randn(B, T, Hq)), dtype) for _ in range(3)]
    idx = None
    if data.draw(st.booleans()):
        idx = selected_indices(gen, B, T, Hkv, topk, bs, torch.int32)
    kw = dict(kernel_size=ks, kernel_stride=stride, block_size=bs, topk=topk, window_size=W)
    ref_idx = idx
    if idx is None and dtype != F64:
        with torch.no_grad():
            _, lse = la.nsa_compressed_attn(
                q.x,
                kc.x,
                vc.x,
                kernel_size=ks,
                kernel_stride=stride,
                cu_seqlens=tgt.put(cu),
                return_lse=True,
            )
            ref_idx = la.nsa_topk_blocks(
                q.x, kc.x, lse, kernel_size=ks, kernel_stride=stride, block_size=bs,
                topk=topk, cu_seqlens=tgt.put(cu),
            ).cpu()  # fmt: skip
    out = la.nsa_attn(
        q.x, k.x, v.x, *(g.x for g in gates), k_cmp=kc.x, v_cmp=vc.x, cu_seqlens=tgt.put(cu),
        block_indices=tgt.put(idx), **kw,
    )  # fmt: skip
    ref = nsa_attn_ref(
        *refs(q, k, v), refs(*gates), kc.ref, vc.ref, ks, stride, bs, topk, W, cu, ref_idx
    )
    assert_close(out, ref, dtype)
    check_grads([(out, ref)], [q, k, v, kc, vc, *gates], gen, dtype, tgt)


# every case, in the order of the suites
CASES = [
    lightning, rat, landmark_attn, landmark_topk_blocks, nsa_compress, nsa_compressed_attn,
    nsa_topk_blocks, nsa_selected_attn, sliding_window_attn, nsa_attn,
]  # fmt: skip
