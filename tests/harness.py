"""The shared test harness: devices, dtypes, one tolerance table, and the check of an op against
its float64 reference (forward and backward).

An op's result is compared with a float64 reference computed from the same rounded inputs, two
ways (``assert_close_to_ref``):

- norm-wise: ``rel_err`` = ‖out − ref‖ / ‖ref‖ within the tolerance of the dtype and device
  (``TOL``), and
- element-wise: max |out − ref| within ``ELEMENT_FACTOR`` × that tolerance × max |ref| or, where
  the test also has the same computation done in the low dtype (``low=``), within ``LOW_FACTOR``
  × that computation's largest error plus ``LOW_SLACK`` × eps(dtype) × max |ref| (the rule of
  FlashAttention's tests).

The norm of a large tensor dilutes an error confined to a few rows; the element-wise bound does
not. Non-finite reference values (−inf lse rows) must be matched exactly, and every other value
must be finite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import torch

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
LOW = (BF16, F16)

HAS_CUDA = torch.cuda.is_available()
# a Hopper GPU: eligible 16-bit calls run the sm_90a attention engine unless forced onto sm_80
HAS_HOPPER = HAS_CUDA and torch.cuda.get_device_capability() == (9, 0)
NEEDS_CUDA = "needs a CUDA device"

# "cpu" always, "cuda" only where a GPU is present (the only tests skipped by default).
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)]
    ),
]
# the same, as plain strings, for loops inside a test
AVAILABLE_DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def cuda_only(test):
    """A CUDA-only test (or class): marked ``cuda`` and skipped without a CUDA device."""
    return pytest.mark.cuda(pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)(test))


# ----------------------------------------------------------------------------- tolerances

# Norm-wise tolerance against the float64 reference, (outputs, gradients) by device and dtype.
# float32 on CUDA runs 3xTF32 tensor cores: float32-accurate outputs; gradients that sum over
# many tokens and heads (dk/dv of a GQA group) cost up to a few 1e-5. bfloat16/float16 round P
# and the carried states to the input precision. No float64 kernels on CUDA.
TOL = {
    "cpu": {F64: (1e-12, 1e-12), F32: (1e-5, 1e-5), BF16: (2e-2, 2e-2), F16: (2e-2, 2e-2)},
    "cuda": {F32: (1e-5, 5e-5), BF16: (2e-2, 2e-2), F16: (2e-2, 2e-2)},
}
# element-wise: max |out − ref| ≤ ELEMENT_FACTOR · tol · max |ref|
ELEMENT_FACTOR = 4.0
# with a low-precision computation: max |out − ref| ≤ LOW_FACTOR · max |low − ref|
#                                                    + LOW_SLACK · eps(dtype) · max |ref|
LOW_FACTOR = 4.0
LOW_SLACK = 4.0


def tolerance(dtype: torch.dtype, device: str = "cpu", grad: bool = False) -> float:
    """The norm-wise tolerance of ``TOL`` (``device`` may be "cuda:0" or a torch.device)."""
    out, grads = TOL[torch.device(device).type][dtype]
    return grads if grad else out


# ----------------------------------------------------------------------------- errors


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (||a - b|| when b is all zeros). NaN/Inf give nan/inf."""
    a64 = a.detach().to(device="cpu", dtype=torch.float64)
    b64 = b.detach().to(device="cpu", dtype=torch.float64)
    assert a64.shape == b64.shape, f"shape mismatch: {tuple(a64.shape)} vs {tuple(b64.shape)}"
    num = torch.linalg.vector_norm(a64 - b64).item()
    den = torch.linalg.vector_norm(b64).item()
    return num / den if den > 0 else num


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| in float64 (0 for empty tensors)."""
    d = a.detach().to(device="cpu", dtype=F64) - b.detach().to(device="cpu", dtype=F64)
    return d.abs().max().item() if d.numel() else 0.0


def element_bound(
    ref: torch.Tensor, dtype: torch.dtype, tol: float, low: torch.Tensor | None = None
) -> float:
    """The largest element-wise error ``assert_close_to_ref`` accepts (see the module doc)."""
    ref64 = ref.detach().to(device="cpu", dtype=F64)
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    if low is None:
        # an all-zero reference: rel_err is absolute, so is this bound
        return ELEMENT_FACTOR * tol * (scale if scale > 0 else 1.0)
    eps = torch.finfo(dtype).eps
    return LOW_FACTOR * max_err(low, ref64) + LOW_SLACK * eps * scale


def assert_finite(t: torch.Tensor, name: str = "tensor") -> None:
    bad = ~torch.isfinite(t)
    assert not bad.any(), f"{name} has {int(bad.sum())} non-finite values (of {t.numel()})"


def assert_close_to_ref(
    name: str,
    got: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    device: str = "cpu",
    *,
    grad: bool = False,
    tol: float | None = None,
    low: torch.Tensor | None = None,
) -> float:
    """``got`` (computed in ``dtype`` on ``device``) against its float64 reference: same shape,
    the reference's non-finite values exactly, finite values elsewhere, rel_err within ``tol``
    (default ``tolerance(dtype, device, grad)``) and the element-wise bound (``element_bound``;
    ``low`` is the same computation done in the low dtype, where the test has it). Returns the
    relative error."""
    got = got.detach().cpu()
    ref = ref.detach().cpu()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    fin = torch.isfinite(ref)
    if not fin.all():
        assert torch.equal(torch.isfinite(got), fin), f"{name}: non-finite pattern differs"
        assert torch.equal(got[~fin].double(), ref[~fin].double()), f"{name}: non-finite differ"
        got, ref = got[fin], ref[fin]
        low = None if low is None else low.detach().cpu()[fin]
    assert_finite(got, name)
    tol = tolerance(dtype, device, grad) if tol is None else tol
    err = rel_err(got, ref)
    assert err <= tol, f"{name}: rel err {err:.3e} > {tol:.3g} ({dtype}, {device})"
    worst, bound = max_err(got, ref), element_bound(ref, dtype, tol, low)
    assert worst <= bound, (
        f"{name}: an element is off by {worst:.3e} > {bound:.3e} (rel err {err:.3e}, "
        f"max |ref| {ref.abs().max().item():.3e}; {dtype}, {device})"
    )
    return err


# ----------------------------------------------------------------------------- forward + backward


def leaf(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Detached copies that require grad."""
    return [t.detach().clone().requires_grad_() for t in ts]


def _cotangent(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A random output gradient in float64 on the reference's device, rounded to ``dtype``."""
    return torch.randn(ref.shape, dtype=F64, device=ref.device).to(dtype).to(F64)


def fwd_bwd(
    fn: Callable,
    inputs: Sequence,
    device: str = "cpu",
    *,
    ref_fn: Callable | None = None,
    ref_device: str = "cpu",
    wrt: Sequence[bool] | None = None,
    low_fn: Callable | None = None,
) -> list[tuple]:
    """Forward and backward of ``fn`` on ``inputs`` (as given, moved to ``device``) and of
    ``ref_fn`` (default ``fn``) on their float64 copies on ``ref_device``, under the same random
    output gradients (drawn in float64, rounded to the op's output dtype: both sides get the same
    values). ``fn`` returns a tensor or a tuple of tensors; floating inputs are differentiated
    (those where ``wrt`` is false are not); other inputs (indices, None) pass through.

    Returns ``[(out, ref_out) per output] + [(grad, ref_grad) per differentiated input]``; an
    input that no output depends on gets zeros. With ``low_fn`` (the same computation in the
    inputs' low precision, run like ``fn``) every entry is ``(got, ref, low)``.
    """
    wrt = [True] * len(inputs) if wrt is None else list(wrt)

    def run(f, dev, to64):
        xs, leaves = [], []
        for t, w in zip(inputs, wrt, strict=True):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t = t.detach().to(dev, F64 if to64 else t.dtype, copy=True).requires_grad_(w)
                if w:
                    leaves.append(t)
            elif isinstance(t, torch.Tensor):
                t = t.to(dev)
            xs.append(t)
        outs = f(*xs)
        return (list(outs) if isinstance(outs, tuple | list) else [outs]), leaves

    def grads(outs, leaves, cotangents):
        used = [(o, d) for o, d in zip(outs, cotangents, strict=True) if d is not None]
        got = [None] * len(leaves)
        if used and leaves:
            got = torch.autograd.grad(
                [o for o, _ in used], leaves, [d.to(o.device, o.dtype) for o, d in used],
                allow_unused=True,
            )  # fmt: skip
        return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, got, strict=True)]

    outs, leaves = run(fn, device, False)
    refs, ref_leaves = run(ref_fn or fn, ref_device, True)
    # outputs that depend on no input (empty, or not differentiable) get no gradient
    dos = [
        _cotangent(r, o.dtype) if r.requires_grad and r.numel() > 0 else None
        for o, r in zip(outs, refs, strict=True)
    ]
    got, want = outs + grads(outs, leaves, dos), refs + grads(refs, ref_leaves, dos)
    result = list(zip(got, want, strict=True))
    if low_fn is None:
        return result
    lows, low_leaves = run(low_fn, device, False)
    return [(*r, lo) for r, lo in zip(result, lows + grads(lows, low_leaves, dos), strict=True)]


def check_fwd_bwd(
    fn: Callable,
    inputs: Sequence,
    dtype: torch.dtype,
    device: str = "cpu",
    *,
    ref_fn: Callable | None = None,
    ref_device: str = "cpu",
    names: Sequence[str] | None = None,
    num_outputs: int = 1,
    wrt: Sequence[bool] | None = None,
    low_fn: Callable | None = None,
    tol: float | None = None,
    grad_tol: float | None = None,
) -> list[tuple]:
    """``fwd_bwd`` and ``assert_close_to_ref`` of every entry: the first ``num_outputs`` as
    outputs (``tol``), the rest as gradients (``grad_tol``; defaults from ``TOL``), against
    ``low_fn``'s where given. ``names`` label the entries in failure messages. Returns the
    entries of ``fwd_bwd``."""
    kw = dict(ref_fn=ref_fn, ref_device=ref_device, wrt=wrt, low_fn=low_fn)
    entries = fwd_bwd(fn, inputs, device, **kw)
    names = names or [f"out{i}" for i in range(num_outputs)] + [
        f"grad{i}" for i in range(len(entries) - num_outputs)
    ]
    for i, (name, (a, b, *low)) in enumerate(zip(names, entries, strict=True)):
        g = i >= num_outputs
        t = grad_tol if g else tol
        assert_close_to_ref(name, a, b, dtype, device, grad=g, tol=t, low=low[0] if low else None)
    return entries


# ----------------------------------------------------------------------------- buffers, paths


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a floating tensor with NaN in place (an unwritten element then fails a check)."""
    return t.fill_(float("nan"))


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def engine_path(monkeypatch, force_sm80: bool):
    """Selects the CUDA path (LONGATTN_FORCE_SM80, else the engine: LONGATTN_SM90=1, and
    LONGATTN_LANDMARK_SM90 opts landmark in) and returns a check that the Hopper engine ran (or,
    forced or on another GPU, did not) for the calls made since."""
    from longattn import _native

    monkeypatch.setenv("LONGATTN_FORCE_SM80", "1" if force_sm80 else "0")
    monkeypatch.setenv("LONGATTN_SM90", "1")
    monkeypatch.setenv("LONGATTN_LANDMARK_SM90", "1")
    before = _native.sm90_launch_count()

    def check(expect_engine: bool = True):
        ran = _native.sm90_launch_count() > before
        assert ran == (expect_engine and HAS_HOPPER and not force_sm80)

    return check
