"""RATCache decode (docs/api/rat.md, "Module and decode"): the cache layout (rotated states in the
module dtype, geometric capacity, in-place updates) and the fused CUDA ``rat_decode`` kernel against
the float64 reference and the PyTorch path."""

from __future__ import annotations

import pytest
import torch
from harness import BF16, F16, F32, F64, assert_close_to_ref, cuda_only, rel_err
from longattn.nn.rat import RATAttention, RATCache, _capacity_for, rat_continue
from longattn.ops.rat import rat_attn_with_states, rat_decode, rat_decode_splits
from longattn.reference.rat import rat_attn_reference, rat_rope


def make(B, T, H, D, dtype, device="cpu"):
    q, k, v = (torch.randn(B, T, H, D, device=device).to(dtype) for _ in range(3))
    g = torch.sigmoid(torch.randn(B, T, H, D, device=device) + 1.0)
    return q, k, v, g.to(F64) if dtype == F64 else g


def empty_cache(B, H, D, dtype=F32, device=None, capacity=16) -> RATCache:
    """An empty cache of B sequences with H heads of size D: ``RATAttention.init_cache`` of a
    module with that geometry (the one cache constructor)."""
    return RATAttention(H * D, H, ngroups=1, dtype=dtype, device=device).init_cache(
        B, capacity=capacity
    )


def decode_all(q, k, v, g, cache, L, rope_theta=10000.0, steps=None):
    """Feeds the tokens in steps (default one at a time); returns the concatenated outputs."""
    T = q.shape[1]
    steps = steps or [1] * T
    outs, t = [], 0
    for m in steps:
        sl = slice(t, t + m)
        y, cache = rat_continue(
            q[:, sl], k[:, sl], v[:, sl], g[:, sl], cache, chunk_size=L, rope_theta=rope_theta
        )
        outs.append(y)
        t += m
    assert t == T
    return torch.cat(outs, 1), cache


# ----------------------------------------------------------------------------- CPU: layout


def test_capacity_is_geometric():
    assert [_capacity_for(n) for n in (0, 1, 16, 17, 33, 257)] == [16, 16, 16, 32, 64, 512]


@pytest.mark.parametrize("L", [1, 3])
def test_cache_grows_and_holds_rotated_states(L):
    """40 tokens from an empty cache (capacity 16): the states are the rotated chunk-final
    states of the full forward, the output equals the float64 reference."""
    B, T, H, D = 2, 40, 2, 8
    q, k, v, g = make(B, T, H, D, F64)
    cache = empty_cache(B, H, D, dtype=F64)
    y, cache = decode_all(q, k, v, g, cache, L)
    torch.testing.assert_close(y, rat_attn_reference(q, k, v, g, chunk_size=L))
    C = T // L
    assert cache.seen == T and cache.num_chunks == C and cache.capacity == _capacity_for(C)
    _, _, ks, vs = rat_attn_with_states(q, k, v, g, chunk_size=L)
    kr = rat_rope(ks[:, :C], torch.arange(C), 10000.0)
    torch.testing.assert_close(cache.k_states, kr.transpose(1, 2))
    torch.testing.assert_close(cache.v_states, vs[:, :C].transpose(1, 2))


def test_prefill_cache_layout_and_dtype():
    """A bf16 prefill stores bf16 rotated states and a float32 running state."""
    from longattn.nn.rat import RATAttention

    m = RATAttention(64, 4, chunk_size=4, ngroups=2).to(BF16)
    x = torch.randn(1, 13, 64).to(BF16)
    _, cache = m(x, use_cache=True)
    assert cache.k_store.dtype == BF16 and cache.k_run.dtype == F32
    assert cache.num_chunks == 3 and cache.k_states.shape == (1, 4, 3, 16)
    assert cache.capacity >= 4


def test_clone_branches_and_in_place_update():
    B, T, H, D, L = 1, 20, 2, 8, 4
    q, k, v, g = make(B, T, H, D, F64)
    q2, k2, v2, g2 = make(B, T, H, D, F64)
    cache = empty_cache(B, H, D, dtype=F64)
    _, cache = decode_all(q[:, :9], k[:, :9], v[:, :9], g[:, :9], cache, L, steps=[5, 4])
    branch = cache.clone()
    y1, out = decode_all(q[:, 9:], k[:, 9:], v[:, 9:], g[:, 9:], cache, L)
    assert out is cache and cache.seen == T
    y2, _ = decode_all(q2[:, 9:], k2[:, 9:], v2[:, 9:], g2[:, 9:], branch, L)
    full1 = rat_attn_reference(q, k, v, g, chunk_size=L)
    pairs = zip((q, k, v, g), (q2, k2, v2, g2), strict=True)
    cat = [torch.cat([a[:, :9], b[:, 9:]], 1) for a, b in pairs]
    full2 = rat_attn_reference(*cat, chunk_size=L)
    torch.testing.assert_close(y1, full1[:, 9:])
    torch.testing.assert_close(y2, full2[:, 9:])


def test_cache_of_another_dtype_is_cast_once():
    B, T, H, D, L = 1, 7, 2, 8, 2
    q, k, v, g = make(B, T, H, D, F64)
    cache = empty_cache(B, H, D)  # float32 default, used by a float64 caller
    y, cache = decode_all(q, k, v, g, cache, L)
    assert cache.k_store.dtype == F64 and cache.k_run.dtype == F64
    torch.testing.assert_close(y, rat_attn_reference(q, k, v, g, chunk_size=L))


def test_cache_with_another_chunk_size_is_rejected():
    B, H, D = 1, 2, 8
    q, k, v, g = make(B, 5, H, D, F64)
    _, cache = decode_all(q, k, v, g, empty_cache(B, H, D, dtype=F64), 4)
    with pytest.raises(ValueError, match="chunk_size"):
        rat_continue(q[:, :1], k[:, :1], v[:, :1], g[:, :1], cache, chunk_size=2)


def test_rat_decode_op_is_cuda_only():
    B, H, D = 1, 2, 8
    q, k, v, g = make(B, 1, H, D, F32)
    cache = empty_cache(B, H, D)
    with pytest.raises(ValueError, match="CUDA tensors only"):
        rat_decode(
            q, k, v, g, cache.k_run, cache.v_run, cache.k_store, cache.v_store, 0, 4, 0.3, None
        )


def test_decode_splits():
    assert rat_decode_splits(8192, 256, 132) == 1  # batch 512 x 16 heads fills the GPU
    assert rat_decode_splits(2, 100, 132) == 1  # too few states to split
    s = rat_decode_splits(2, 1000, 132)
    assert 1 < s <= 1000 // 64
    per = -(-1000 // s)
    assert (s - 1) * per < 1000  # no empty split


# ----------------------------------------------------------------------------- CUDA


def check(name, out, ref, dtype):
    assert_close_to_ref(name, out, ref, dtype, "cuda")


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("L", [1, 3, 16])
@pytest.mark.parametrize("BH", [(1, 2), (48, 16)])
def test_cuda_decode_steps_equal_full_forward(dtype, D, L, BH):
    """Token by token from an empty cache (first-chunk steps with C = 0, chunk-completing
    steps, capacity growth past 16 slots for L = 1) against the float64 reference."""
    B, H = BH
    T = 40
    q, k, v, g = make(B, T, H, D, dtype, "cuda")
    cache = empty_cache(B, H, D, dtype=dtype, device="cuda")
    y, cache = decode_all(q, k, v, g, cache, L)
    yr = rat_attn_reference(*(t.cpu().double() for t in (q, k, v, g)), chunk_size=L)
    check("y", y, yr, dtype)
    assert cache.num_chunks == T // L and cache.k_store.is_cuda


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cuda_prefill_then_decode(dtype):
    """Fused prefill, fused one-token steps and PyTorch prefill chunks mixed."""
    B, T, H, D, L = 2, 150, 2, 64, 16
    q, k, v, g = make(B, T, H, D, dtype, "cuda")
    cache = empty_cache(B, H, D, dtype=dtype, device="cuda")
    steps = [37, 1, 1, 9, 1, 1, 1, 1, 1, 1, 1, 1, 30] + [1] * 64
    y, cache = decode_all(q, k, v, g, cache, L, steps=steps)
    yr = rat_attn_reference(*(t.cpu().double() for t in (q, k, v, g)), chunk_size=L)
    check("y", y, yr, dtype)


def random_cache(B, H, D, C, seen, dtype, device):
    cache = empty_cache(B, H, D, dtype=dtype, device=device, capacity=_capacity_for(C + 1))
    cache.k_store[:, :, :C] = torch.randn(B, H, C, D, device=device).to(dtype)
    cache.v_store[:, :, :C] = torch.randn(B, H, C, D, device=device).to(dtype)
    cache.k_run.copy_(torch.randn(B, H, D, device=device))
    cache.v_run.copy_(torch.randn(B, H, D, device=device))
    cache.seen, cache.num_chunks = seen, C
    return cache


def as_f64_cpu(cache):
    return RATCache(
        *(t.cpu().double() for t in (cache.k_store, cache.v_store, cache.k_run, cache.v_run)),
        cache.seen,
        cache.num_chunks,
    )


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("D,rope", [(128, 10000.0), (64, 10000.0), (36, 500.0), (33, None)])
@pytest.mark.parametrize("C", [0, 5, 300, 1000])
@pytest.mark.parametrize("offset", [0, 7, 15])
@pytest.mark.parametrize("BH", [(1, 2), (64, 16)])
def test_cuda_decode_step_matches_pytorch_path(dtype, D, rope, C, offset, BH):
    """One step from a random cache of C states (large C with few rows: split over CTAs and
    combined; D = 36 and 33: scalar loads; offset 0: a fresh chunk; 15: the step appends its
    state) against the float64 PyTorch path on the same cache: y, running state, new slot."""
    B, H = BH
    if B * H * C * D > 4_000_000:
        pytest.skip("large for the float64 CPU path")
    L = 16
    cache = random_cache(B, H, D, C, C * L + offset, dtype, "cuda")
    ref = as_f64_cpu(cache)
    q, k, v, g = make(B, 1, H, D, dtype, "cuda")
    y, cache = rat_continue(q, k, v, g, cache, chunk_size=L, rope_theta=rope)
    yr, ref = rat_continue(
        *(t.cpu().double() for t in (q, k, v, g)), ref, chunk_size=L, rope_theta=rope
    )
    check("y", y, yr, dtype)
    tol_run = 1e-6 if dtype == F32 else 1e-2
    assert rel_err(cache.k_run, ref.k_run) <= tol_run
    assert rel_err(cache.v_run, ref.v_run) <= tol_run
    assert cache.seen == ref.seen and cache.num_chunks == ref.num_chunks
    if offset == L - 1:
        check("appended k", cache.k_store[:, :, C], ref.k_store[:, :, C], dtype)
        check("appended v", cache.v_store[:, :, C], ref.v_store[:, :, C], dtype)
    # the states before C are untouched
    assert torch.equal(cache.k_states[:, :, :C].cpu().double(), ref.k_states[:, :, :C])


@cuda_only
def test_cuda_decode_strided_inputs_and_bf16_gate():
    """q, k, v as slices of one projection (strided heads), g in bf16."""
    B, H, D, L = 3, 4, 64, 4
    qkv = torch.randn(B, 1, H, 3 * D, device="cuda").to(BF16)
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    g = torch.sigmoid(torch.randn(B, 1, H, D, device="cuda")).to(BF16)
    cache = random_cache(B, H, D, 9, 9 * L + 2, BF16, "cuda")
    ref = as_f64_cpu(cache)
    y, _ = rat_continue(q, k, v, g, cache, chunk_size=L)
    yr, _ = rat_continue(*(t.cpu().double() for t in (q, k, v, g)), ref, chunk_size=L)
    check("y", y, yr, BF16)
