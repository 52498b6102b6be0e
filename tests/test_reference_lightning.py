"""The two lightning references agree with each other, and the slopes with docs/api/lightning.md."""

from __future__ import annotations

import math

import longattn
import pytest
import torch
from harness import F64, rel_err
from longattn.reference import (
    lightning_attn_parallel,
    lightning_attn_recurrent,
    lightning_slopes_reference,
)


def _inputs(B, T, H, D, E, n_state=None, dtype=F64):
    q = torch.randn(B, T, H, D, dtype=dtype)
    k = torch.randn(B, T, H, D, dtype=dtype)
    v = torch.randn(B, T, H, E, dtype=dtype)
    s0 = torch.randn(n_state if n_state is not None else B, H, D, E, dtype=dtype)
    return q, k, v, s0


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("T", [1, 7, 64, 131])
def test_recurrent_equals_parallel(T, with_state):
    B, H, D, E = 2, 4, 6, 9
    q, k, v, s0 = _inputs(B, T, H, D, E)
    slopes = torch.tensor([0.0, 1e-5, 0.3, 5.0], dtype=F64)
    s0 = s0 if with_state else None
    o_r, st_r = lightning_attn_recurrent(q, k, v, slopes, 0.37, s0)
    o_p, st_p = lightning_attn_parallel(q, k, v, slopes, 0.37, s0)
    assert o_r.shape == (B, T, H, E) and st_r.shape == (B, H, D, E)
    assert o_r.dtype == F64 and st_r.dtype == F64
    assert rel_err(o_r, o_p) < 1e-12
    assert rel_err(st_r, st_p) < 1e-12


def test_recurrent_matches_definition_by_hand():
    """Two tokens, one head, computed by hand from the formulas of docs/api/lightning.md."""
    q = torch.tensor([[[[1.0, 2.0]], [[0.5, -1.0]]]], dtype=F64)  # [1, 2, 1, 2]
    k = torch.tensor([[[[3.0, -1.0]], [[2.0, 1.0]]]], dtype=F64)
    v = torch.tensor([[[[1.0, 0.0, 2.0]], [[-1.0, 4.0, 0.5]]]], dtype=F64)  # E = 3
    s = torch.tensor([0.4], dtype=F64)
    s0 = torch.arange(6, dtype=F64).reshape(1, 1, 2, 3)
    lam = math.exp(-0.4)
    S = s0[0, 0].clone()
    expected = []
    for t in range(2):
        S = lam * S + torch.outer(k[0, t, 0], v[0, t, 0])
        expected.append(2.0 * q[0, t, 0] @ S)
    for fn in (lightning_attn_recurrent, lightning_attn_parallel):
        o, st = fn(q, k, v, s, 2.0, s0)
        torch.testing.assert_close(o[0, :, 0], torch.stack(expected), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(st[0, 0], S, rtol=1e-13, atol=1e-13)


def test_zero_slope_is_cumulative_sum():
    B, T, H, D, E = 1, 20, 1, 3, 4
    q, k, v, _ = _inputs(B, T, H, D, E)
    o, st = lightning_attn_recurrent(q, k, v, torch.zeros(1, dtype=F64))
    kv = torch.einsum("bthd,bthe->bthde", k, v).cumsum(1)
    torch.testing.assert_close(o, torch.einsum("bthd,bthde->bthe", q, kv))
    torch.testing.assert_close(st, kv[:, -1])


@pytest.mark.parametrize("with_state", [False, True])
def test_varlen_recurrent_equals_parallel_and_per_sequence(with_state):
    H, D, E = 3, 5, 4
    lens = [1, 63, 0, 64, 65, 10]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    total = int(cu[-1])
    q, k, v, s0 = _inputs(1, total, H, D, E, n_state=len(lens))
    s0 = s0 if with_state else None
    slopes = torch.tensor([0.01, 0.2, 1.5], dtype=F64)
    o_r, st_r = lightning_attn_recurrent(q, k, v, slopes, 1.0, s0, cu)
    o_p, st_p = lightning_attn_parallel(q, k, v, slopes, 1.0, s0, cu)
    assert o_r.shape == (1, total, H, E) and st_r.shape == (len(lens), H, D, E)
    assert rel_err(o_r, o_p) < 1e-12
    assert rel_err(st_r, st_p) < 1e-12
    # each sequence on its own gives the same result (states restart at sequence starts)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        si = None if s0 is None else s0[i : i + 1]
        o_i, st_i = lightning_attn_parallel(q[:, a:b], k[:, a:b], v[:, a:b], slopes, 1.0, si)
        torch.testing.assert_close(o_r[:, a:b], o_i, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(st_r[i : i + 1], st_i, rtol=1e-12, atol=1e-12)
    # the empty sequence passes its initial state through unchanged (zeros without one)
    expected_empty = torch.zeros(H, D, E, dtype=F64) if s0 is None else s0[2]
    torch.testing.assert_close(st_r[2], expected_empty)


def test_references_have_matching_gradients():
    B, T, H, D, E = 1, 40, 2, 4, 3
    q, k, v, s0 = _inputs(B, T, H, D, E)
    slopes = torch.tensor([0.05, 0.7], dtype=F64)
    grads = []
    for fn in (lightning_attn_recurrent, lightning_attn_parallel):
        args = [t.clone().requires_grad_() for t in (q, k, v, slopes, s0)]
        o, st = fn(args[0], args[1], args[2], args[3], 0.5, args[4])
        g = torch.Generator().manual_seed(1)
        do = torch.randn(o.shape, dtype=F64, generator=g)
        dst = torch.randn(st.shape, dtype=F64, generator=g)
        grads.append(torch.autograd.grad((o * do).sum() + (st * dst).sum(), args))
    for a, b in zip(*grads, strict=True):
        assert rel_err(a, b) < 1e-10


def test_parallel_reference_gradcheck():
    B, T, H, D, E = 1, 9, 2, 3, 2
    q, k, v, s0 = _inputs(B, T, H, D, E)
    slopes = torch.tensor([0.05, 0.7], dtype=F64)
    args = [t.clone().requires_grad_() for t in (q, k, v, slopes, s0)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, d, e: lightning_attn_parallel(a, b, c, d, 0.5, e), args
    )


def test_low_precision_reference_keeps_float32_state():
    q, k, v, s0 = _inputs(1, 16, 2, 8, 8, dtype=torch.bfloat16)
    s0 = s0.float()
    slopes = torch.tensor([0.1, 0.01])
    o, st = lightning_attn_recurrent(q, k, v, slopes, 1.0, s0)
    assert o.dtype == torch.bfloat16 and st.dtype == torch.float32
    o64, st64 = lightning_attn_recurrent(
        q.double(), k.double(), v.double(), slopes.double(), 1.0, s0.double()
    )
    assert rel_err(o, o64) < 1e-2
    assert rel_err(st, st64) < 1e-2


# ----------------------------------------------------------------------------------- slopes


def test_slopes_reference_known_values():
    torch.testing.assert_close(
        lightning_slopes_reference(8),
        torch.tensor([2.0**-i for i in range(1, 9)], dtype=torch.float32),
        rtol=0,
        atol=0,
    )
    # H = 12: the 8-head ladder then entries 0, 2, 4, 6 of the 16-head ladder
    ref12 = [2.0**-i for i in range(1, 9)] + [2.0 ** (-0.5 * (j + 1)) for j in (0, 2, 4, 6)]
    torch.testing.assert_close(
        lightning_slopes_reference(12), torch.tensor(ref12, dtype=torch.float32), rtol=0, atol=0
    )
    # layer scaling: first layer keeps 1 + 1e-5, last layer keeps 1e-5
    base = lightning_slopes_reference(8).double()
    torch.testing.assert_close(
        lightning_slopes_reference(8, 0, 5).double(), base * (1 + 1e-5), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        lightning_slopes_reference(8, 4, 5).double(), base * 1e-5, rtol=1e-6, atol=0
    )


@pytest.mark.parametrize("H", [1, 2, 3, 5, 8, 12, 16, 40, 64, 96])
def test_slopes_match_reference(H):
    s = longattn.lightning_slopes(H)
    assert isinstance(s, torch.Tensor)
    assert s.shape == (H,) and s.dtype == torch.float32 and s.device.type == "cpu"
    torch.testing.assert_close(s, lightning_slopes_reference(H), rtol=1e-6, atol=0)
    assert (s > 0).all() and (s < 1).all()


@pytest.mark.parametrize("H", [8, 12, 16, 40, 64, 96])
@pytest.mark.parametrize(
    "layer_idx,num_layers", [(0, 1), (1, 2), (0, 4), (1, 4), (3, 4), (7, 80), (79, 80), (0, 0)]
)
def test_slopes_layer_scaling_match_reference(H, layer_idx, num_layers):
    s = longattn.lightning_slopes(H, layer_idx=layer_idx, num_layers=num_layers)
    ref = lightning_slopes_reference(H, layer_idx, num_layers)
    assert s.shape == (H,) and s.dtype == torch.float32
    torch.testing.assert_close(s, ref, rtol=1e-6, atol=0)
    # factor relative to the unscaled ladder
    if num_layers <= 1:
        factor = 1 + 1e-5
    else:
        factor = 1 - layer_idx / (num_layers - 1) + 1e-5
    torch.testing.assert_close(
        s.double(), longattn.lightning_slopes(H).double() * factor, rtol=1e-6, atol=0
    )
