"""longattn.nn RATAttention / RATCache (docs/api/rat.md, "Module and decode")."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from harness import F64, cuda_only
from longattn.nn.rat import RATAttention
from longattn.reference.rat import rat_attn_reference


def official_math(m: RATAttention, x: torch.Tensor) -> torch.Tensor:
    """The official layer's token mixer in plain PyTorch on the module's weights."""
    B, T, Dm = x.shape
    H, G, D = m.num_heads, m.ngroups, m.head_dim
    h = x
    if m.norm_and_residual:
        h = m.norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.norm.eps))
    zvgqk = F.linear(h, m.in_proj.weight, m.in_proj.bias)
    z, v, g, q, k = zvgqk.split([Dm, Dm, Dm, G * D, G * D], dim=-1)
    g = torch.sigmoid(g + m.gate_bias.to(x.dtype)).view(B, T, H, D)
    heads = torch.arange(H) % G  # head h uses group h mod G
    q = q.view(B, T, G, D)[:, :, heads]
    k = k.view(B, T, G, D)[:, :, heads]
    y = rat_attn_reference(q, k, v.view(B, T, H, D), g, chunk_size=m.chunk_size)
    out = F.linear(y.reshape(B, T, Dm) * torch.sigmoid(z), m.out_proj.weight, m.out_proj.bias)
    return x + out if m.norm_and_residual else out


def module(L=4, norm=False, **kw):
    return RATAttention(64, 4, chunk_size=L, ngroups=2, norm_and_residual=norm, dtype=F64, **kw)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("L", [1, 4, 16])
def test_module_matches_official_math(norm, L):
    m = module(L, norm, bias=True)
    x = torch.randn(2, 19, 64, dtype=F64)
    y, cache = m(x)
    assert cache is None
    torch.testing.assert_close(y, official_math(m, x), rtol=1e-10, atol=1e-10)


def test_gate_bias_init_and_group_tiling():
    m = RATAttention(64, 4, chunk_size=16, ngroups=2)
    b = m.gate_bias.detach()
    assert m.gate_bias.dtype == torch.float32
    assert (b >= 0).all() and (b <= torch.log(torch.tensor(15.0)) + 1e-6).all()
    x = torch.randn(1, 5, 64)
    _, q, k, _, g = m.project(x)
    assert g.dtype == torch.float32
    for h in range(4):
        torch.testing.assert_close(q[:, :, h], q[:, :, h % 2])
        torch.testing.assert_close(k[:, :, h], k[:, :, h % 2])
    assert m.to(torch.bfloat16).gate_bias.dtype == torch.float32


@pytest.mark.parametrize("L", [1, 4, 5])
def test_decode_from_empty_cache_equals_full_forward(L):
    """One token at a time from the first token on (the first-chunk decode case)."""
    m = module(L)
    x = torch.randn(2, 13, 64, dtype=F64)
    full, _ = m(x)
    cache = m.init_cache(2)
    outs = []
    for t in range(13):
        y, cache = m(x[:, t : t + 1], cache=cache, use_cache=True)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.seen == 13 and cache.num_chunks == 13 // L
    assert cache.k_states.shape == (2, 4, 13 // L, 16)


@pytest.mark.parametrize("T0", [4, 6, 9])
def test_prefill_then_decode_and_chunked_prefill(T0):
    m = module(4, norm=True)
    x = torch.randn(1, 30, 64, dtype=F64)
    full, _ = m(x)
    y0, cache = m(x[:, :T0], use_cache=True)
    torch.testing.assert_close(y0, full[:, :T0], rtol=1e-10, atol=1e-10)
    outs = [y0]
    t = T0
    for step in (1, 1, 5, 3, 1, 7):  # one-token steps and prefill chunks
        y, cache = m(x[:, t : t + step], cache=cache, use_cache=True)
        outs.append(y)
        t += step
    torch.testing.assert_close(torch.cat(outs, 1), full[:, :t], rtol=1e-10, atol=1e-10)


def test_decode_float32_module():
    m = RATAttention(64, 4, chunk_size=4, ngroups=2)
    x = torch.randn(1, 11, 64)
    full, _ = m(x)
    _, cache = m(x[:, :7], use_cache=True)
    outs = []
    for t in range(7, 11):
        y, cache = m(x[:, t : t + 1], cache=cache, use_cache=True)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), full[:, 7:], rtol=1e-4, atol=1e-5)


def test_module_backward_and_varlen():
    m = RATAttention(64, 4, chunk_size=4, ngroups=1)
    x = torch.randn(1, 20, 64, requires_grad=True)
    cu = torch.tensor([0, 9, 20], dtype=torch.int32)
    y, _ = m(x, cu_seqlens=cu)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert m.gate_bias.grad is not None and m.in_proj.weight.grad is not None
    y1, _ = m(x[:, 9:].detach())
    torch.testing.assert_close(y[:, 9:], y1, rtol=1e-5, atol=1e-5)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="ngroups"):
        RATAttention(64, 4, ngroups=3)
    with pytest.raises(ValueError, match="num_heads"):
        RATAttention(64, 5)
    with pytest.raises(ValueError, match="chunk_size"):
        RATAttention(64, 4, chunk_size=0)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_module_forward_backward_and_decode(dtype):
    """On CUDA: the fused op forward/backward, prefill + one-token decode (the fused rat_decode
    kernel) + chunked prefill (PyTorch over the cached states) equal the full forward."""
    m = RATAttention(256, 2, chunk_size=16, ngroups=2, norm_and_residual=True, device="cuda")
    m = m.to(dtype)
    x = torch.randn(2, 90, 256, device="cuda", dtype=dtype)
    full, _ = m(x)
    ref, _ = copy.deepcopy(m).double().cpu()(x.double().cpu())  # float64 runs on the CPU only
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    err = (full.double().cpu() - ref).norm() / ref.norm()
    assert err < tol, f"rel err {err:.3e}"
    y0, cache = m(x[:, :37], use_cache=True)
    outs, t = [y0], 37
    for step in (1, 1, 12, 1, 5, 1, 32):
        y, cache = m(x[:, t : t + step], cache=cache, use_cache=True)
        outs.append(y)
        t += step
    assert t == 90 and cache.k_states.is_cuda
    dec = torch.cat(outs, 1).double()
    err = (dec - full.double()).norm() / full.double().norm()
    assert err < tol, f"decode vs full forward: rel err {err:.3e}"
    xg = x.detach().requires_grad_()
    y, _ = m(xg)
    y.float().square().sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
