"""The shared test harness itself (tests/harness.py): the element-wise bound catches errors that
the norm dilutes, the forward/backward helper, the tolerance table, the cuda marker."""

from __future__ import annotations

import pytest
import torch
from harness import (
    BF16,
    F32,
    F64,
    NEEDS_CUDA,
    TOL,
    assert_close_to_ref,
    check_fwd_bwd,
    fwd_bwd,
    rel_err,
    tolerance,
)


def _rounded(shape, dtype):
    """float64 values and their dtype rounding (an error of the dtype's size everywhere)."""
    ref = torch.randn(*shape, dtype=F64)
    return ref, ref.to(dtype)


def test_errors_confined_to_a_few_rows_fail_element_wise():
    ref, got = _rounded((4096, 64), BF16)
    assert_close_to_ref("o", got, ref, BF16)
    bad = got.clone()
    bad[17] = 0  # one wrong row of 4096: 1.6% of the norm, under the 2e-2 tolerance
    assert rel_err(bad, ref) <= tolerance(BF16)
    with pytest.raises(AssertionError, match="an element is off"):
        assert_close_to_ref("o", bad, ref, BF16)


def test_low_precision_bound():
    """With the same computation in the low dtype, elements may be off by a few times its
    largest error (plus a slack of a few eps), not more."""
    ref = torch.randn(512, 32, dtype=F64)
    low = ref.to(BF16)
    ok = (ref * (1 + 2 * torch.finfo(BF16).eps)).to(F32)
    assert_close_to_ref("o", ok, ref, BF16, low=low)
    bad = ok.clone()
    bad[3, 5] += 0.1 * ref.abs().max()
    assert rel_err(bad, ref) <= tolerance(BF16)
    with pytest.raises(AssertionError, match="an element is off"):
        assert_close_to_ref("o", bad, ref, BF16, low=low)


def test_non_finite_reference_values_must_match():
    ref = torch.tensor([1.0, -float("inf"), 2.0], dtype=F64)
    assert_close_to_ref("lse", ref.to(F32), ref, F32)
    with pytest.raises(AssertionError, match="non-finite pattern"):
        assert_close_to_ref("lse", torch.tensor([1.0, 0.0, 2.0]), ref, F32)
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_to_ref("o", torch.tensor([1.0, float("nan"), 2.0]), ref.nan_to_num(), F32)


def test_fwd_bwd_same_cotangents_and_unused_inputs():
    x, y = torch.randn(5, 3), torch.randn(5, 3)
    idx = torch.tensor([0, 2])
    entries = fwd_bwd(lambda x, y, i: (x * 2)[i], (x, y, idx))
    (out, ref), (dx, dx_ref), (dy, dy_ref) = entries
    assert out.dtype == F32 and ref.dtype == F64 and dx.dtype == F32 and dx_ref.dtype == F64
    assert torch.equal(dx.double(), dx_ref)  # the same (rounded) cotangent on both sides
    assert (dy == 0).all() and (dy_ref == 0).all()  # y is unused
    pairs = fwd_bwd(lambda x, y, i: x.sum() * y, (x, y, idx), wrt=[False, True, True])
    assert len(pairs) == 2  # the output, dy


def test_check_fwd_bwd_uses_the_reference_and_the_table():
    x = torch.randn(64, 8, dtype=F64).to(BF16)
    ref = lambda x: torch.softmax(x, -1)  # noqa: E731
    check_fwd_bwd(lambda x: ref(x.float()).to(BF16), (x,), BF16, ref_fn=ref, names=["p", "dx"])
    with pytest.raises(AssertionError, match="grad0: rel err"):
        check_fwd_bwd(lambda x: ref(x.float()).to(BF16), (x,), BF16, ref_fn=ref, grad_tol=1e-6)


def test_tolerance_table():
    assert tolerance(F32) == TOL["cpu"][F32][0]
    assert tolerance(F32, "cuda:1", grad=True) == TOL["cuda"][F32][1]
    for device, table in TOL.items():
        for dtype, (out, grad) in table.items():
            assert 0 < out <= grad < 0.1, (device, dtype)


def test_every_cuda_test_is_marked(request):
    """Every collected test that runs on CUDA (a ``device`` parameter of "cuda", or skipped for
    want of a GPU) carries the cuda marker, so that ``-m cuda`` selects it."""
    unmarked = []
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        on_cuda = callspec is not None and callspec.params.get("device") == "cuda"
        on_cuda |= any(m.kwargs.get("reason") == NEEDS_CUDA for m in item.iter_markers("skipif"))
        if on_cuda and item.get_closest_marker("cuda") is None:
            unmarked.append(item.nodeid)
    assert not unmarked, unmarked[:10]
