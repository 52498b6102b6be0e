"""NSA selection stage (compression and block selection) on every device against the float64
references (docs/api/nsa.md, "Math": compression and selection).

Block selection is compared for exact equality. Inputs are random (not constructed tie-free),
so rows whose n-th and (n+1)-th block scores are within 1e-4 (relative, float64) are left out
of the comparison: any rounding may legitimately reorder them. Such rows must stay rare (< 2%).
The float64 scorer used at large T (``topk_fast``) is itself checked against the per-token
reference ``nsa_topk_blocks_reference`` at small T.
"""

from __future__ import annotations

import math

import pytest
import torch
from harness import BF16, DEVICES, F16, F32, F64, assert_close_to_ref, check_fwd_bwd, tolerance
from longattn.ops import nsa as N
from longattn.reference import nsa as R

TIE = 1e-4


def _seqs(B, T, cu):
    if cu is None:
        return [(b, 0, T) for b in range(B)]
    c = cu.tolist()
    return [(0, s, e - s) for s, e in zip(c[:-1], c[1:], strict=True)]


def _offsets(seqs, ks, kd, cu, C):
    out, acc = [], 0
    for _, _, n in seqs:
        nw = R.nsa_num_windows(n, ks, kd)
        out.append((acc, nw) if cu is not None else (0, C))
        acc += nw
    return out


def compressed_lse(q, k_cmp, ks, kd, scale, cu=None):
    """float64 log-sum-exp of compressed attention (−inf for rows without a window)."""
    B, T, Hq, D = q.shape
    Hkv = k_cmp.shape[2]
    G = Hq // Hkv
    lse = torch.full((B, T, Hq), -math.inf, dtype=F64)
    seqs = _seqs(B, T, cu)
    for (b, s, n), (c0, cl) in zip(seqs, _offsets(seqs, ks, kd, cu, k_cmp.shape[1]), strict=True):
        if n == 0 or cl == 0:
            continue
        qq = q[b, s : s + n].double().cpu()
        kk = k_cmp[b, c0 : c0 + cl].double().cpu().repeat_interleave(G, dim=1)
        sc = torch.einsum("thd,chd->htc", qq, kk) * scale
        t = torch.arange(n)[:, None]
        vis = t >= torch.arange(cl)[None, :] * kd + ks - 1
        sc = sc.masked_fill(~vis[None], -math.inf)
        lse[b, s : s + n] = torch.logsumexp(sc, dim=-1).transpose(0, 1)
    return lse


def topk_fast(q, k_cmp, lse, ks, kd, bk, n, init, local, scale, cu=None):
    """Vectorised float64 selection: (indices [B, T, Hkv, n] int32, near-tie mask [B, T, Hkv])."""
    B, T, Hq, D = q.shape
    Hkv = k_cmp.shape[2]
    G = Hq // Hkv
    a, bb = ks // kd, bk // kd
    out = torch.full((B, T, Hkv, n), -1, dtype=torch.int32)
    tie = torch.zeros(B, T, Hkv, dtype=torch.bool)
    seqs = _seqs(B, T, cu)
    for (b, s, L), (c0, cl) in zip(seqs, _offsets(seqs, ks, kd, cu, k_cmp.shape[1]), strict=True):
        if L == 0:
            continue
        nbm = (L - 1) // bk + 1
        t = torch.arange(L)
        tb = t // bk
        # window -> block weights: number of (x, y) with bb·j + y − x = i
        wm = torch.zeros(max(cl, 1), nbm, dtype=F64)
        for j in range(nbm):
            for x in range(a):
                for y in range(bb):
                    i = bb * j + y - x
                    if 0 <= i < cl:
                        wm[i, j] += 1
        qq = q[b, s : s + L].double().cpu()
        kk = k_cmp[b, c0 : c0 + cl].double().cpu()
        ll = lse[b, s : s + L].double().cpu()
        vis = t[:, None] >= torch.arange(cl)[None, :] * kd + ks - 1  # [L, cl]
        j = torch.arange(nbm)
        forced = (j[None, :] < init) | (j[None, :] + local > tb[:, None])
        exists = j[None, :] <= tb[:, None]
        for g in range(Hkv):
            sc = torch.einsum("thd,cd->thc", qq[:, g * G : (g + 1) * G], kk[:, g]) * scale
            p = torch.exp(sc - ll[:, g * G : (g + 1) * G, None]).masked_fill(~vis[:, None], 0)
            P = p.sum(1)  # [L, cl]
            score = P @ wm[:cl] if cl > 0 else torch.zeros(L, nbm, dtype=F64)
            score = torch.where(forced, math.inf, score)
            score = torch.where(exists, score, -1.0)
            order = torch.sort(-score, dim=1, stable=True).indices  # ties: lower block first
            srt = torch.gather(score, 1, order)
            m = min(n, nbm)
            sel = order[:, :m]
            cnt = torch.clamp(tb + 1, max=n)
            sel = torch.where(torch.arange(m)[None, :] < cnt[:, None], sel, nbm + 1)
            sel = torch.sort(sel, dim=1).values
            sel = torch.where(sel > nbm, -1, sel)
            out[b, s : s + L, g, :m] = sel.to(torch.int32)
            if nbm > n:
                lo, hi = srt[:, n - 1], srt[:, n]
                close = (lo - hi) <= TIE * lo.abs().clamp_min(1e-300)
                close = close & torch.isfinite(lo) & (hi >= 0)
                tie[b, s : s + L, g] = close
    return out, tie


def make_topk_inputs(B, T, Hq, Hkv, D, ks, kd, dtype, device, cu=None, mag=1.0):
    q = (torch.randn(B, T, Hq, D, dtype=F64) * mag).to(dtype)
    k = torch.randn(B, T, Hkv, D, dtype=F64).to(dtype)
    kc, _ = R.nsa_compress_reference(k.double(), kernel_size=ks, kernel_stride=kd, cu_seqlens=cu)
    kc = kc.to(dtype)
    scale = D**-0.5
    lse = compressed_lse(q, kc, ks, kd, scale, cu).to(F32)
    return q.to(device), kc.to(device), lse.to(device), scale


def check_topk(q, kc, lse, scale, ks, kd, bk, n, init, local, cu=None, exact_ref=False):
    dev = q.device
    cu_d = None if cu is None else cu.to(dev)
    got = N.nsa_topk_blocks(
        q, kc, lse, kernel_size=ks, kernel_stride=kd, block_size=bk, topk=n,
        init_blocks=init, local_blocks=local, scale=scale, cu_seqlens=cu_d,
    ).cpu()  # fmt: skip
    want, tie = topk_fast(q.cpu(), kc.cpu(), lse.cpu(), ks, kd, bk, n, init, local, scale, cu)
    if exact_ref:
        ref = R.nsa_topk_blocks_reference(
            q.cpu().double(), kc.cpu().double(), lse.cpu().double(), kernel_size=ks,
            kernel_stride=kd, block_size=bk, topk=n, init_blocks=init, local_blocks=local,
            scale=scale, cu_seqlens=cu,
        )  # fmt: skip
        ok = ~tie[..., None].expand_as(ref)
        assert torch.equal(ref[ok], want[ok]), "topk_fast disagrees with the reference"
    assert got.shape == want.shape and got.dtype == torch.int32
    # Far blocks score near 0, so near-ties grow with G (T=4096, G=16: 3.1% of rows; G=4: 1.6%).
    assert tie.float().mean().item() < 0.05, f"too many near-ties: {tie.float().mean():.3f}"
    keep = ~tie
    bad = (got != want).any(-1) & keep
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{int(bad.sum())} rows differ; first at {idx}: got {got[tuple(idx)].tolist()} "
            f"want {want[tuple(idx)].tolist()}"
        )


# ----------------------------------------------------------------------------- block selection


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G", [1, 2, 3, 4, 16])
def test_topk_vs_reference_small(device, G):
    q, kc, lse, scale = make_topk_inputs(1, 300, 2 * G, 2, 32, 8, 4, F32, device)
    check_topk(q, kc, lse, scale, 8, 4, 16, 4, 1, 2, exact_ref=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bk", [32, 64, 128])
@pytest.mark.parametrize("n", [1, 4, 16])
def test_topk_block_sizes_and_counts(device, bk, n):
    q, kc, lse, scale = make_topk_inputs(1, 1500, 4, 2, 64, 32, 16, BF16, device)
    check_topk(q, kc, lse, scale, 32, 16, bk, n, 1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("init,local", [(0, 0), (1, 2), (3, 1), (0, 4)])
def test_topk_forced_blocks(device, init, local):
    q, kc, lse, scale = make_topk_inputs(2, 700, 8, 2, 64, 16, 8, F16, device)
    check_topk(q, kc, lse, scale, 16, 8, 32, 8, init, local)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("G", [1, 4, 16])
def test_topk_large_t(device, dtype, G):
    if device == "cpu" and G == 16:
        pytest.skip("the CPU kernel is covered at smaller sizes")
    q, kc, lse, scale = make_topk_inputs(1, 4096, 2 * G, 2, 128, 32, 16, dtype, device)
    check_topk(q, kc, lse, scale, 32, 16, 64, 16, 1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("G", [1, 2, 4, 16])
def test_topk_varlen(device, G):
    cu = torch.tensor([0, 5, 5, 40, 300, 333, 1100], dtype=torch.int32)
    q, kc, lse, scale = make_topk_inputs(1, 1100, 2 * G, 2, 64, 16, 8, BF16, device, cu=cu)
    check_topk(q, kc, lse, scale, 16, 8, 32, 6, 1, 1, cu=cu, exact_ref=(G <= 2))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_varlen_int64_tiny_sequences(device):
    cu = torch.tensor([0, 1, 2, 31, 32, 33, 97, 98], dtype=torch.int64)
    q, kc, lse, scale = make_topk_inputs(1, 98, 3, 1, 32, 8, 4, F32, device, cu=cu)
    check_topk(q, kc, lse, scale, 8, 4, 8, 3, 1, 1, cu=cu, exact_ref=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", [1, 2, 31, 32, 33, 65])
def test_topk_tiny_t(device, T):
    q, kc, lse, scale = make_topk_inputs(2, T, 4, 1, 32, 8, 4, F32, device)
    check_topk(q, kc, lse, scale, 8, 4, 8, 2, 1, 1, exact_ref=True)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_large_logits(device):
    q, kc, lse, scale = make_topk_inputs(1, 900, 8, 2, 64, 32, 16, BF16, device, mag=30.0)
    check_topk(q, kc, lse, scale, 32, 16, 64, 8, 1, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_noncontiguous_q(device):
    q, kc, lse, scale = make_topk_inputs(1, 500, 8, 2, 64, 32, 16, BF16, device)
    qb = torch.randn(1, 500, 8, 80, device=device).to(BF16)
    qb[..., :64] = q
    check_topk(qb[..., :64], kc, lse, scale, 32, 16, 64, 8, 1, 2)


# ----------------------------------------------------------------------------- compression


def _compress_case(device, dtype, B, T, H, D, ks, kd, linear, with_pe, cu, d_out=None):
    x = torch.randn(B, T, H, D, dtype=F64).to(dtype)
    w = pe = None
    if linear:
        w = (torch.randn(H, ks * D, d_out or D, dtype=F64) / math.sqrt(ks * D)).to(dtype)
        if with_pe:
            pe = torch.randn(H, ks, D, dtype=F64).to(dtype)
    inputs = [t for t in (x, w, pe) if t is not None]
    cu_cmp = {}

    def run(compress, key):
        def call(x, w=None, pe=None):
            cu_d = None if cu is None else cu.to(x.device)
            out, cu_cmp[key] = compress(
                x, kernel_size=ks, kernel_stride=kd, weight=w, pe=pe, cu_seqlens=cu_d
            )
            return out

        return call

    # the CPU table's tolerances on CUDA too (float32 gradients within 1e-5)
    tol = tolerance(dtype)
    ker, ref = run(N.nsa_compress, "lo"), run(R.nsa_compress_reference, "hi")
    names = ["out", "dx", "dw", "dpe"][: len(inputs) + 1]
    check_fwd_bwd(ker, inputs, dtype, device, ref_fn=ref, names=names, tol=tol, grad_tol=tol)
    if cu is not None:
        lo = cu_cmp["lo"]
        assert lo.device.type == torch.device(device).type and lo.dtype == cu.dtype
        assert torch.equal(cu_cmp["lo"].cpu(), cu_cmp["hi"].cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("mode", ["mean", "linear", "linear_pe"])
def test_compress_vs_reference(device, dtype, mode):
    _compress_case(device, dtype, 2, 333, 2, 64, 32, 16, mode != "mean", mode == "linear_pe", None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("mode", ["mean", "linear", "linear_pe"])
def test_compress_varlen_short_sequences(device, dtype, mode):
    cu = torch.tensor([0, 5, 5, 40, 300, 331, 400], dtype=torch.int32)
    _compress_case(device, dtype, 1, 400, 3, 32, 16, 8, mode != "mean", mode == "linear_pe", cu)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ks,kd", [(32, 8), (8, 8), (12, 5)])
def test_compress_strides_and_head_dims(device, ks, kd):
    _compress_case(device, BF16, 1, 257, 2, 128, ks, kd, True, True, None, d_out=96)
    _compress_case(device, F32, 1, 100, 1, 48, ks, kd, False, False, None)


@pytest.mark.parametrize("device", DEVICES)
def test_compress_no_windows(device):
    _compress_case(device, F32, 2, 20, 2, 16, 32, 16, True, True, None)
    cu = torch.tensor([0, 3, 20], dtype=torch.int64)
    _compress_case(device, F32, 1, 20, 2, 16, 32, 16, False, False, cu)


@pytest.mark.parametrize("device", DEVICES)
def test_compress_feeds_topk(device):
    """Compression on the device followed by selection, against the float64 pipeline."""
    cu = torch.tensor([0, 300, 1000], dtype=torch.int32)
    k = torch.randn(1, 1000, 2, 64, dtype=F64).to(BF16)
    q = torch.randn(1, 1000, 8, 64, dtype=F64).to(BF16)
    kc, cu_cmp = N.nsa_compress(k.to(device), kernel_size=32, kernel_stride=16,
                                cu_seqlens=cu.to(device))  # fmt: skip
    kc_ref, _ = R.nsa_compress_reference(k.double(), kernel_size=32, kernel_stride=16,
                                         cu_seqlens=cu)  # fmt: skip
    assert_close_to_ref("k_cmp", kc, kc_ref, BF16, device)
    lse = compressed_lse(q, kc.cpu(), 32, 16, 64**-0.5, cu).to(F32)
    check_topk(q.to(device), kc, lse.to(device), 64**-0.5, 32, 16, 64, 4, 1, 2, cu=cu)
