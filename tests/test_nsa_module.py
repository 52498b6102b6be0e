"""longattn.nn NativeSparseAttention / NSACache (docs/api/nsa.md, "Module").

The float64 tests run on the CPU (CUDA has no float64); the module on CUDA is checked in float32
and bfloat16 against the same module in float64 on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from harness import F64, cuda_only, rel_err
from longattn.nn import NativeSparseAttention
from longattn.reference.nsa import (
    nsa_attn_reference,
    nsa_compress_reference,
    nsa_compressed_attn_reference,
    sliding_window_attn_reference,
)

# small shapes: l = 8, d = 4, B_K = 8, n = 4 (1 init + 2 local + 1 free), W = 12
CFG = dict(kernel_size=8, kernel_stride=4, block_size=8, topk=4, window_size=12)


def rope_ref(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent rotate_half RoPE: pairs (i, i + D/2) rotated by pos · theta^(−2i/D)."""
    D = x.shape[-1]
    i = torch.arange(D // 2, dtype=F64, device=x.device)
    ang = pos.to(F64)[:, None] * theta ** (-2 * i / D)  # [T, D/2]
    c, s = ang.cos()[:, None, :].to(x.dtype), ang.sin()[:, None, :].to(x.dtype)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def local_positions(T, cu):
    if cu is None:
        return torch.arange(T)
    pos = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        pos.extend(range(e - s))
    return torch.tensor(pos)


def reference_forward(m: NativeSparseAttention, x: torch.Tensor, cu=None) -> torch.Tensor:
    """The module's math on its weights, with the float64 reference ops."""
    B, T, _ = x.shape
    H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
    ks, d = m.kernel_size, m.kernel_stride
    pos = local_positions(T, cu)
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, T, H, D)
    k = F.linear(x, m.k_proj.weight, m.k_proj.bias).view(B, T, Hkv, D)
    v = F.linear(x, m.v_proj.weight, m.v_proj.bias).view(B, T, Hkv, D)
    g = torch.sigmoid(F.linear(x, m.g_proj.weight, m.g_proj.bias)).view(B, T, H, 3)
    qr, kr = rope_ref(q, pos, m.rope_theta), rope_ref(k, pos, m.rope_theta)
    if m.compress == "linear":
        kc, cu_c = nsa_compress_reference(
            k, kernel_size=ks, kernel_stride=d, weight=m.k_cmp_weight, pe=m.k_cmp_pe,
            cu_seqlens=cu,
        )  # fmt: skip
        kc = rope_ref(kc, local_positions(kc.shape[1], cu_c) * d, m.rope_theta)
        vc, _ = nsa_compress_reference(
            v, kernel_size=ks, kernel_stride=d, weight=m.v_cmp_weight, cu_seqlens=cu
        )
    else:
        kc, _ = nsa_compress_reference(kr, kernel_size=ks, kernel_stride=d, cu_seqlens=cu)
        vc, _ = nsa_compress_reference(v, kernel_size=ks, kernel_stride=d, cu_seqlens=cu)
    o = nsa_attn_reference(
        qr, kr, v, g[..., 0], g[..., 1], g[..., 2], k_cmp=kc, v_cmp=vc, kernel_size=ks,
        kernel_stride=d, block_size=m.block_size, topk=m.topk, window_size=m.window_size,
        init_blocks=m.init_blocks, local_blocks=m.local_blocks, scale=m.scale, cu_seqlens=cu,
    )  # fmt: skip
    return F.linear(o.reshape(B, T, H * D), m.o_proj.weight, m.o_proj.bias)


def module(compress="linear", dtype=F64, bias=False, **kw):
    cfg = {**CFG, **kw}
    m = NativeSparseAttention(32, 4, 2, 8, compress=compress, bias=bias, dtype=dtype, **cfg)
    if compress == "linear":  # move away from the mean-pooling init
        with torch.no_grad():
            std = (m.kernel_size * m.head_dim) ** -0.5
            m.k_cmp_weight.normal_(0, std)
            m.v_cmp_weight.normal_(0, std)
            m.k_cmp_pe.normal_(0, 0.5)
    return m


def all_grads(m, x):
    return [x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("compress", ["linear", "mean"])
@pytest.mark.parametrize("device", ["cpu"])  # float64: CPU only
def test_forward_backward_match_reference_ops(device, compress):
    m = module(compress, bias=True).to(device)
    x = torch.randn(1, 35, 32, dtype=F64, device=device, requires_grad=True)
    y, cache = m(x)
    assert cache is None and y.shape == x.shape and y.dtype == F64
    dy = torch.randn_like(y)
    y.backward(dy)
    got = all_grads(m, x)
    x2 = x.detach().clone().requires_grad_()
    m.zero_grad()
    ref = reference_forward(m, x2)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)
    ref.backward(dy)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, all_grads(m, x2), strict=True):
        assert a is not None, name
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=name)


def test_varlen_matches_reference_and_single_sequences():
    m = module("linear")
    cu = torch.tensor([0, 11, 16, 40], dtype=torch.int32)  # one shorter than l and than B_K
    x = torch.randn(1, 40, 32, dtype=F64)
    y, _ = m(x, cu_seqlens=cu)
    torch.testing.assert_close(y, reference_forward(m, x, cu), rtol=1e-9, atol=1e-10)
    for s, e in ((0, 11), (16, 40)):
        torch.testing.assert_close(y[:, s:e], m(x[:, s:e])[0], rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("compress", ["linear", "mean"])
@pytest.mark.parametrize("device", ["cpu"])  # float64: CPU only
def test_decode_step_by_step_equals_full_forward(device, compress):
    m = module(compress).to(device)
    x = torch.randn(2, 52, 32, dtype=F64, device=device)
    full, _ = m(x)
    cache = m.init_cache(2)
    outs = []
    with torch.no_grad():
        for t in range(52):
            y, cache = m(x[:, t : t + 1], cache=cache, use_cache=True)
            outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-11)
    assert cache.seen == 52 and cache.k.shape == (2, 52, 2, 8)
    assert cache.k_cmp.shape[1] == (52 - 8) // 4 + 1


@pytest.mark.parametrize("compress", ["linear", "mean"])
@pytest.mark.parametrize("T0", [5, 13, 24])
def test_prefill_then_chunks_equals_full_forward(compress, T0):
    m = module(compress, kernel_size=12, kernel_stride=4, block_size=12, topk=3, window_size=9)
    x = torch.randn(1, 90, 32, dtype=F64)
    full, _ = m(x)
    y0, cache = m(x[:, :T0], use_cache=True)
    torch.testing.assert_close(y0, full[:, :T0], rtol=1e-10, atol=1e-11)
    outs, t = [y0], T0
    for step in (1, 7, 1, 19, 3, 1, 30):  # one-token steps and prefill chunks
        y, cache = m(x[:, t : t + step], cache=cache, use_cache=True)
        outs.append(y)
        t += step
    torch.testing.assert_close(torch.cat(outs, 1), full[:, :t], rtol=1e-10, atol=1e-11)
    assert cache.seen == t


def test_cached_continuation_is_differentiable():
    m = module("linear")
    x = torch.randn(1, 30, 32, dtype=F64)
    _, cache = m(x[:, :20], use_cache=True)
    xs = x[:, 20:].clone().requires_grad_()
    y, _ = m(xs, cache=cache)
    y.square().sum().backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    assert m.k_cmp_weight.grad is not None and m.g_proj.weight.grad is not None


@pytest.mark.parametrize("compress", ["linear", "mean"])
def test_gradients_reach_every_parameter(device, compress):
    m = module(compress, dtype=torch.float32, bias=True).to(device)
    x = torch.randn(2, 45, 32, device=device, requires_grad=True)
    y, _ = m(x)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(device, dtype):
    m64 = module("linear")
    m = module("linear", dtype=dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in m64.state_dict().items()})
    m = m.to(device)
    x64 = torch.randn(2, 50, 32, dtype=F64)
    y, _ = m(x64.to(device=device, dtype=dtype))
    assert y.shape == (2, 50, 32) and y.dtype == dtype and y.device.type == device
    assert torch.isfinite(y.float()).all()
    # same weights in float64: low-precision error only (selection may differ in bf16 ties)
    ref, _ = m64.to(F64)(x64)
    f32_tol = 1e-5 if device == "cpu" else 1e-4  # CUDA float32: 3xTF32 tensor cores, exp2
    tol = f32_tol if dtype == torch.float32 else 6e-2
    assert rel_err(y, ref) < tol
    # decode in the low-precision module follows its own full forward
    _, cache = m(x64[:, :40].to(device=device, dtype=dtype), use_cache=True)
    assert cache.k.dtype == dtype
    outs = []
    for t in range(40, 50):
        yt, cache = m(x64[:, t : t + 1].to(device=device, dtype=dtype), cache=cache, use_cache=True)
        outs.append(yt)
    tol = f32_tol if dtype == torch.float32 else 3e-2
    assert rel_err(torch.cat(outs, 1), y[:, 40:]) < tol


@pytest.mark.parametrize("branch", [0, 1, 2])
def test_gate_layout_cmp_slc_swa(branch):
    """Gate index 0 = compressed, 1 = selected, 2 = sliding window, per head (fla layout)."""
    m = module("mean", bias=True)
    with torch.no_grad():
        m.g_proj.weight.zero_()
        bias = torch.full((4, 3), -40.0, dtype=F64)
        bias[:, branch] = 40.0
        m.g_proj.bias.copy_(bias.reshape(-1))
    x = torch.randn(1, 30, 32, dtype=F64)
    y, _ = m(x)
    pos = torch.arange(30)
    q = rope_ref(m.q_proj(x).view(1, 30, 4, 8), pos, m.rope_theta)
    k = rope_ref(m.k_proj(x).view(1, 30, 2, 8), pos, m.rope_theta)
    v = m.v_proj(x).view(1, 30, 2, 8)
    kc, _ = nsa_compress_reference(k, kernel_size=8, kernel_stride=4)
    vc, _ = nsa_compress_reference(v, kernel_size=8, kernel_stride=4)
    if branch == 0:
        o, _ = nsa_compressed_attn_reference(q, kc, vc, kernel_size=8, kernel_stride=4)
    elif branch == 1:
        o = reference_forward(m, x)  # the gates already pick the selected branch
    else:
        o = sliding_window_attn_reference(q, k, v, window_size=m.window_size)
    if branch != 1:
        o = m.o_proj(o.reshape(1, 30, 32))
    torch.testing.assert_close(y, o, rtol=1e-9, atol=1e-10)


def test_linear_compression_starts_as_mean_pooling():
    lin = NativeSparseAttention(32, 4, 2, 8, dtype=F64, **CFG)
    assert lin.k_cmp_pe.abs().sum() == 0
    k = torch.randn(1, 20, 2, 8, dtype=F64)
    kc_lin, vc_lin = lin._compress(k, k, k)
    kc_mean, _ = nsa_compress_reference(k, kernel_size=8, kernel_stride=4)
    pos = torch.arange(kc_mean.shape[1]) * 4  # rotated at the window start i·d
    torch.testing.assert_close(kc_lin, rope_ref(kc_mean, pos, 10000.0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(vc_lin, kc_mean, rtol=1e-12, atol=1e-14)
    mean = module("mean")
    assert mean.k_cmp_weight is None and mean.v_cmp_weight is None and mean.k_cmp_pe is None


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        NativeSparseAttention(32, 4, 3, 8)
    with pytest.raises(ValueError, match="compress"):
        NativeSparseAttention(32, 4, 2, 8, compress="conv")
    with pytest.raises(ValueError, match="kernel_stride"):
        NativeSparseAttention(32, 4, 2, 8, kernel_size=8, kernel_stride=3)
    with pytest.raises(ValueError, match="head_dim"):
        NativeSparseAttention(32, 4, 2, 7)
    m = module("mean")
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(1, 8, 32, dtype=F64), use_cache=True, cu_seqlens=torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="x: expected"):
        m(torch.randn(1, 8, 31, dtype=F64))


@cuda_only
@pytest.mark.parametrize("compress", ["linear", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_module_matches_float64_and_decodes(compress, dtype):
    m64 = module(compress, bias=True)
    m = copy.deepcopy(m64).to(device="cuda", dtype=dtype)
    x = torch.randn(2, 52, 32, dtype=F64)
    do = torch.randn(2, 52, 32, dtype=F64)
    y64, _ = m64(x)
    (y64 * do).sum().backward()
    y, _ = m(x.to("cuda", dtype))
    (y.double() * do.cuda()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert rel_err(y, y64) <= tol
    for (name, p64), p in zip(m64.named_parameters(), m.parameters(), strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert rel_err(p.grad, p64.grad) <= (1e-3 if dtype == torch.float32 else 6e-2), name
    with torch.no_grad():
        full, _ = m(x.to("cuda", dtype))
        y0, cache = m(x[:, :20].to("cuda", dtype), use_cache=True)
        outs = [y0]
        for t in range(20, 52):
            y1, cache = m(x[:, t : t + 1].to("cuda", dtype), cache=cache, use_cache=True)
            outs.append(y1)
    assert rel_err(torch.cat(outs, 1), full) <= (1e-5 if dtype == torch.float32 else 2e-2)
    assert cache.seen == 52 and cache.k.is_cuda
