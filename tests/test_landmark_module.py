"""longattn.nn LandmarkAttention / LandmarkCache (docs/api/landmark.md, "Module").

The ``device`` tests also run on CUDA, in float32 there (the CUDA kernels take float32, float16
and bfloat16), against the same float64 references.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from harness import F64, rel_err
from longattn.nn import LandmarkAttention
from longattn.reference.landmark import landmark_attn_reference


def on_device(m, device):
    """(module, dtype, tolerance) for a device: the float64 module on CPU, a float32 copy on
    CUDA."""
    if device == "cpu":
        return m, F64, None
    return copy.deepcopy(m).to(device=device, dtype=torch.float32), torch.float32, 2e-5


def rope_ref(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Independent rotate_half RoPE of x ``[..., T, H, D]`` at positions ``[T]``."""
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


def qkv(m, x):
    B, T, _ = x.shape
    q = F.linear(x, m.q_proj.weight, m.q_proj.bias).view(B, T, m.num_heads, m.head_dim)
    k = F.linear(x, m.k_proj.weight, m.k_proj.bias).view(B, T, m.num_kv_heads, m.head_dim)
    v = F.linear(x, m.v_proj.weight, m.v_proj.bias).view(B, T, m.num_kv_heads, m.head_dim)
    return q, k, v


def reference_forward(m: LandmarkAttention, x: torch.Tensor, cu=None) -> torch.Tensor:
    """Training-mode module math on its weights with the float64 dense reference."""
    B, T, _ = x.shape
    q, k, v = qkv(m, x)
    pos = local_positions(T, cu)
    o = landmark_attn_reference(
        rope_ref(q, pos, m.rope_theta), rope_ref(k, pos, m.rope_theta), v,
        block_size=m.block_size, cu_seqlens=cu,
    )  # fmt: skip
    return F.linear(o.reshape(B, T, -1), m.o_proj.weight, m.o_proj.bias)


def official_decode(m: LandmarkAttention, x: torch.Tensor, t: int, topk: int) -> torch.Tensor:
    """Output ``[B, hidden]`` of token t decoded with top-k retrieval, written from the official
    inference (epfml/landmark-attention llama_mem.py, mem_freq = bs − 1, cache_top_k = topk):
    landmark keys at mem_pos, selected blocks at selected_indices, grouped softmax over
    [selected blocks | current block]; retrieval per kv head = max over its query heads."""
    B = x.shape[0]
    H, Hkv, D, bs = m.num_heads, m.num_kv_heads, m.head_dim, m.block_size
    G = H // Hkv
    th = m.rope_theta
    q, k, v = qkv(m, x[:, : t + 1])
    qt = rope_ref(q[:, t : t + 1], torch.tensor([t]), th)[:, 0]  # [B, H, D]
    num_mems = t // bs
    full_len = num_mems * bs
    top_k = min(topk, num_mems)
    prefix_len = full_len - (top_k + 1) * bs
    out = torch.zeros(B, H, D, dtype=x.dtype)
    for b in range(B):
        for h in range(H):
            g = h // G
            cur = [p for p in range(full_len, t + 1) if p % bs != bs - 1]  # own landmark masked
            kc = rope_ref(k[b, full_len : t + 1, g][:, None], torch.arange(full_len, t + 1), th)
            logits = [(qt[b, h] @ kc[p - full_len, 0]) / math.sqrt(D) for p in cur]
            values = [v[b, p, g] for p in cur]
            groups = []  # (gate logit, inner logits, values) per selected block
            if num_mems:
                mem_idx = [0] * (num_mems - top_k) + list(range(1, top_k + 1))
                mem_pos = torch.tensor([i * bs + bs - 1 + prefix_len for i in mem_idx])
                lm = rope_ref(k[b, bs - 1 : full_len : bs, g][:, None], mem_pos, th)[:, 0]
                qg = rope_ref(q[b, t : t + 1, g * G : (g + 1) * G], torch.tensor([t]), th)[0]
                score = (qg @ lm.T).amax(0)  # max over the group's heads
                order = sorted(range(num_mems), key=lambda j: (-score[j].item(), j))[:top_k]
                for r, j in enumerate(sorted(order)):
                    slot_start = r * bs + (bs if j >= num_mems - top_k else 0) + prefix_len
                    ks = rope_ref(
                        k[b, j * bs : (j + 1) * bs, g][:, None],
                        torch.arange(slot_start, slot_start + bs),
                        th,
                    )[:, 0]
                    s = (ks @ qt[b, h]) / math.sqrt(D)
                    groups.append((s[bs - 1], s[: bs - 1], v[b, j * bs : (j + 1) * bs - 1, g]))
            outer = torch.stack([*logits, *(gl for gl, _, _ in groups)])
            lse = torch.logsumexp(outer, 0)
            o = sum(torch.exp(s - lse) * val for s, val in zip(logits, values, strict=True))
            for gl, inner, vals in groups:
                o = o + torch.exp(gl - lse) * (torch.softmax(inner, 0) @ vals)
            out[b, h] = o
    return F.linear(out.reshape(B, H * D), m.o_proj.weight, m.o_proj.bias)


def module(bs=5, topk=None, dtype=F64, bias=False, heads=(4, 2)):
    return LandmarkAttention(32, heads[0], heads[1], 8, block_size=bs, topk=topk, bias=bias,
                             dtype=dtype)  # fmt: skip


@pytest.mark.parametrize("bs", [4, 5, 16])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)])
def test_forward_backward_match_reference(device, bs, heads):
    if device != "cpu":
        m = module(bs, bias=True, heads=heads)
        md, dt, tol = on_device(m, device)
        x = torch.randn(2, 43, 32, dtype=F64)
        xd = x.to(device, dt).requires_grad_()
        y, _ = md(xd)
        dy = torch.randn_like(y)
        y.backward(dy)
        x2 = x.clone().requires_grad_()
        ref = reference_forward(m, x2)
        ref.backward(dy.cpu().double())
        assert rel_err(y, ref) < tol
        assert rel_err(xd.grad, x2.grad) < tol
        for (name, a), b in zip(md.named_parameters(), m.parameters(), strict=True):
            assert rel_err(a.grad, b.grad) < tol, name
        return
    m = module(bs, bias=True, heads=heads).to(device)
    x = torch.randn(2, 43, 32, dtype=F64, device=device, requires_grad=True)  # 43 % bs != 0
    y, cache = m(x)
    assert cache is None and y.shape == x.shape and y.dtype == F64
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [x.grad] + [p.grad for p in m.parameters()]
    x2 = x.detach().clone().requires_grad_()
    m.zero_grad()
    ref = reference_forward(m, x2)
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-10)
    ref.backward(dy)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, [x2.grad] + [p.grad for p in m.parameters()], strict=True):
        assert a is not None, name
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=name)


def test_varlen_matches_reference():
    m = module(5)
    cu = torch.tensor([0, 3, 17, 40], dtype=torch.int32)
    x = torch.randn(1, 40, 32, dtype=F64)
    y, _ = m(x, cu_seqlens=cu)
    torch.testing.assert_close(y, reference_forward(m, x, cu), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(y[:, 17:], m(x[:, 17:])[0], rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("bs", [4, 5])
def test_retrieval_with_topk_at_least_blocks_equals_training_forward(device, bs):
    """Every block retrieved: each sits at its true position, so decoding == training mode."""
    m, dt, tol = on_device(module(bs, topk=100), device)
    x = torch.randn(2, 27, 32, dtype=F64).to(device, dt)
    full, _ = m(x)
    cache = m.init_cache(2)
    outs = []
    with torch.no_grad():
        for t in range(27):
            y, cache = m(x[:, t : t + 1], cache=cache, use_cache=True)
            outs.append(y)
    if tol is None:
        torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-11)
    else:
        assert rel_err(torch.cat(outs, 1), full) < tol
        return
    assert cache.seen == 27 and cache.k.shape == (2, 27, 2, 8)
    # the cache holds the keys before RoPE
    torch.testing.assert_close(cache.k, qkv(m, x)[1], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("topk", [None, 100])
@pytest.mark.parametrize("T0", [4, 10, 11])
def test_prefill_then_chunks_equals_full_forward(topk, T0):
    m = module(5, topk=topk)
    x = torch.randn(1, 50, 32, dtype=F64)
    full, _ = m(x)
    y0, cache = m(x[:, :T0], use_cache=True)
    outs, t = [y0], T0
    for step in (1, 6, 1, 12, 3, 1):
        y, cache = m(x[:, t : t + step], cache=cache, use_cache=True)
        outs.append(y)
        t += step
    torch.testing.assert_close(torch.cat(outs, 1), full[:, :t], rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("topk", [1, 3])
def test_top_k_retrieval_matches_official_inference(topk):
    """topk < number of blocks: remapped positions and per-token block choice."""
    m = module(5, topk=topk)
    x = torch.randn(2, 28, 32, dtype=F64)
    _, cache = m(x[:, :12], use_cache=True)
    got = []
    for t in range(12, 28):
        y, cache = m(x[:, t : t + 1], cache=cache, use_cache=True)
        got.append(y[:, 0])
        torch.testing.assert_close(y[:, 0], official_decode(m, x, t, topk), rtol=1e-9, atol=1e-10)
    # a chunk with a cache decodes its tokens exactly as one-by-one decoding does
    _, cache = m(x[:, :12], use_cache=True)
    y_chunk, _ = m(x[:, 12:28], cache=cache, use_cache=True)
    torch.testing.assert_close(y_chunk, torch.stack(got, 1), rtol=1e-12, atol=1e-12)
    # and retrieval really drops blocks here
    full, _ = m(x)
    assert rel_err(y_chunk, full[:, 12:]) > 1e-6


def test_gradients_reach_every_parameter(device):
    m = module(5, dtype=torch.float32, bias=True).to(device)
    x = torch.randn(2, 29, 32, device=device, requires_grad=True)
    y, _ = m(x)
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(device, dtype):
    m64 = module(5, topk=2)
    m = module(5, topk=2, dtype=dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in m64.state_dict().items()})
    m = m.to(device)
    x64 = torch.randn(2, 30, 32, dtype=F64)
    x = x64.to(device=device, dtype=dtype)
    y, _ = m(x)
    assert y.shape == (2, 30, 32) and y.dtype == dtype and y.device.type == device
    ref, _ = m64(x64)
    ref = ref.to(device)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    assert rel_err(y, ref) < tol
    _, cache = m(x[:, :20], use_cache=True)
    assert cache.k.dtype == dtype
    _, c64 = m64(x64[:, :20], use_cache=True)
    for t in range(20, 30):
        yt, cache = m(x[:, t : t + 1], cache=cache, use_cache=True)
        rt, c64 = m64(x64[:, t : t + 1], cache=c64, use_cache=True)
        rt = rt.to(device)
        assert yt.dtype == dtype and torch.isfinite(yt.float()).all()
        if dtype == torch.float32:  # bf16 may retrieve other blocks on near ties
            assert rel_err(yt, rt) < 1e-5


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="num_kv_heads"):
        LandmarkAttention(32, 4, 3, 8)
    with pytest.raises(ValueError, match="block_size"):
        LandmarkAttention(32, 4, 2, 8, block_size=1)
    with pytest.raises(ValueError, match="topk"):
        LandmarkAttention(32, 4, 2, 8, topk=0)
    with pytest.raises(ValueError, match="head_dim"):
        LandmarkAttention(32, 4, 2, 7)
    m = module(5)
    with pytest.raises(ValueError, match="cu_seqlens"):
        m(torch.randn(1, 8, 32, dtype=F64), use_cache=True, cu_seqlens=torch.tensor([0, 8]))
    _, cache = m(torch.randn(1, 8, 32, dtype=F64), use_cache=True)
    with pytest.raises(ValueError, match="cache"):
        m(torch.randn(2, 1, 32, dtype=F64), cache=cache)
