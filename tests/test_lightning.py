"""longattn.lightning_attn against the references (docs/api/lightning.md).

Tolerances follow docs/reliability.md, "Numerical checks": tests/harness.py (the float64
reference, norm-wise and element-wise), except float32 on CUDA (TF32): within 1e-3; bf16/fp16
never worse than 2x the error of the same recurrence computed in that low precision (norm-wise;
element-wise by the harness's rule for a low-precision computation).
"""

from __future__ import annotations

import longattn
import pytest
import torch
from harness import (
    BF16,
    DEVICES,
    F16,
    F32,
    F64,
    LOW,
    assert_close_to_ref,
    check_fwd_bwd,
    cuda_only,
    fwd_bwd,
    rel_err,
)
from longattn.reference import lightning_attn_parallel, lightning_attn_recurrent

# slopes used by the tests, per head (s = 0 is allowed: lambda = 1, a plain cumulative sum)
SLOPE_POOL = [0.0, 2.0**-8, 0.1, 5.0, 0.02, 0.7, 1e-5, 0.3]


# float32 on CUDA runs TF32 tensor cores: looser than harness.TOL's
CUDA_TOL_F32 = 1e-3


def fp32_tol(device: str) -> float:
    return 1e-5 if device == "cpu" else CUDA_TOL_F32


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


def make_slopes(H: int, device, dtype=F32) -> torch.Tensor:
    vals = [SLOPE_POOL[h % len(SLOPE_POOL)] for h in range(H)]
    return torch.tensor(vals, dtype=dtype, device=device)


def make_inputs(B, T, H, D, E, dtype, device, *, n_state=None, mag=1.0, with_state=True):
    q = (torch.randn(B, T, H, D, device=device) * mag).to(dtype)
    k = (torch.randn(B, T, H, D, device=device) * mag).to(dtype)
    v = (torch.randn(B, T, H, E, device=device) * mag).to(dtype)
    n = B if n_state is None else n_state
    s0 = torch.randn(n, H, D, E, device=device, dtype=state_dtype(dtype)) if with_state else None
    return q, k, v, s0


def ref64(q, k, v, slopes, scale=1.0, s0=None, cu_seqlens=None):
    """float64 oracle (the masked form; tests/test_reference_lightning.py checks that it
    equals the recurrence)."""
    return lightning_attn_parallel(
        q.double(),
        k.double(),
        v.double(),
        slopes.double(),
        scale,
        None if s0 is None else s0.double(),
        cu_seqlens,
    )


@torch.no_grad()
def ref_low(q, k, v, slopes, scale=1.0, s0=None, cu_seqlens=None):
    """The recurrence computed in the inputs' low precision (float32 state)."""
    return lightning_attn_recurrent(
        q, k, v, slopes.float(), scale, None if s0 is None else s0.float(), cu_seqlens
    )


def call(q, k, v, slopes, scale=1.0, s0=None, cu_seqlens=None, final=True):
    return longattn.lightning_attn(
        q,
        k,
        v,
        slopes,
        scale=scale,
        initial_state=s0,
        output_final_state=final,
        cu_seqlens=cu_seqlens,
    )


def check_close(name, out, ref, dtype, device, low_ref=None):
    """The harness check (outputs and gradients alike) with float32 on CUDA within 1e-3; low_ref
    is the same reference computed in the low precision (for the 2x ratio and the element-wise
    bound), where it is cheap enough to compute."""
    tol = fp32_tol(device) if dtype == F32 else None
    if dtype not in LOW:
        low_ref = None
    err = assert_close_to_ref(name, out, ref, dtype, device, tol=tol, low=low_ref)
    if low_ref is not None:
        low_err = rel_err(low_ref, ref)
        assert err <= 2 * low_err, (
            f"{name}: rel err {err:.3e} > 2x the low-precision reference's {low_err:.3e}"
            f" ({dtype}, {device})"
        )
    return err


def _cheap_low_ref(B, T, H, D, E) -> bool:
    # the Python-loop recurrence is cheap enough below this many state-element updates
    return B * T * H * D * E <= 2048 * 2 * 256 * 256 + 1


# ----------------------------------------------------------------------------- gradcheck


def _gradcheck_inputs(T, slope, n_state, H=2, D=5, E=7):
    q = torch.randn(1, T, H, D, dtype=F64, requires_grad=True)
    k = torch.randn(1, T, H, D, dtype=F64, requires_grad=True)
    v = torch.randn(1, T, H, E, dtype=F64, requires_grad=True)
    slopes = torch.tensor([slope, slope * 0.5][:H], dtype=F64, requires_grad=True)
    s0 = torch.randn(n_state, H, D, E, dtype=F64, requires_grad=True)
    return q, k, v, slopes, s0


@pytest.mark.parametrize("slope", [1e-5, 0.05, 0.7, 5.0])
def test_gradcheck_float64_all_five_gradients(slope):
    """T = 2*64 + 3: two full blocks plus a ragged tail; random S0; the final state is an
    output, so the full Jacobian includes random dS_T directions."""
    inputs = _gradcheck_inputs(2 * 64 + 3, slope, n_state=1)

    def fn(q, k, v, slopes, s0):
        o, st = call(q, k, v, slopes, 0.8, s0)
        return o, st

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_gradcheck_float64_without_state():
    """No initial state and no final-state output (the dS_T = None path)."""
    q, k, v, slopes, _ = _gradcheck_inputs(2 * 64 + 3, 0.05, n_state=1)

    def fn(q, k, v, slopes):
        o, st = call(q, k, v, slopes, 1.0, None, final=False)
        assert st is None
        return o

    assert torch.autograd.gradcheck(fn, (q, k, v, slopes), eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("slope", [0.05, 0.7])
def test_gradcheck_float64_varlen(slope):
    """Three packed sequences (40, 70, 21 tokens): one shorter than a block, one crossing a
    block boundary; one initial state per sequence."""
    cu = torch.tensor([0, 40, 110, 131], dtype=torch.int32)
    inputs = _gradcheck_inputs(131, slope, n_state=3)

    def fn(q, k, v, slopes, s0):
        return call(q, k, v, slopes, 0.8, s0, cu)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def test_float64_gradients_match_reference_with_random_dst():
    """Explicit random dO and dS_T against the reference's autograd gradients (float64)."""
    B, T, H, D, E = 2, 131, 3, 9, 4
    q, k, v, s0 = make_inputs(B, T, H, D, E, F64, "cpu")
    slopes = make_slopes(H, "cpu", F64)
    _check_grads(q, k, v, slopes, s0, 0.6, None, F64, "cpu")


# --------------------------------------------------------------------- forward vs reference

# (B, T, H, D, E, with_state)
FWD_CASES = (
    # T sweep (1 token .. several blocks), D != E
    [(2, T, 4, 64, 48, True) for T in (1, 63, 64, 65, 300, 2048)]
    + [(2, T, 4, 64, 64, False) for T in (1, 65, 300)]
    # head dims incl. non powers of two, D != E both ways
    + [
        (2, 129, 3, 16, 16, True),
        (1, 300, 2, 16, 40, False),
        (2, 129, 2, 96, 96, True),
        (1, 300, 2, 96, 128, True),
        (1, 129, 2, 128, 128, True),
        (1, 300, 2, 128, 64, False),
        (1, 300, 2, 256, 256, True),
        (1, 129, 2, 256, 100, True),
        (1, 130, 3, 5, 7, True),
        (1, 100, 2, 1, 1, True),
        (1, 100, 2, 33, 1, False),
        (1, 70, 2, 1, 200, True),
        (1, 2048, 2, 128, 128, True),
        (1, 2048, 1, 256, 256, True),
    ]
)
CUDA_ONLY_CASES = [
    (2, 8192, 4, 128, 128, True),
    (1, 8192, 2, 64, 64, False),
    (1, 8192, 2, 256, 256, True),
    (1, 5000, 2, 96, 200, True),
]


def _fwd_case_id(c):
    B, T, H, D, E, st = c
    return f"B{B}-T{T}-H{H}-D{D}-E{E}" + ("-S0" if st else "")


def _run_forward_check(case, dtype, device):
    B, T, H, D, E, with_state = case
    q, k, v, s0 = make_inputs(B, T, H, D, E, dtype, device, with_state=with_state)
    slopes = make_slopes(H, device, F64 if dtype == F64 else F32)
    scale = D**-0.5
    o, st = call(q, k, v, slopes, scale, s0)
    assert o.shape == (B, T, H, E) and o.dtype == dtype and o.device == q.device
    assert st.shape == (B, H, D, E) and st.dtype == state_dtype(dtype)
    assert st.device == q.device
    o_ref, st_ref = ref64(q, k, v, slopes, scale, s0)
    o_low = st_low = None
    if dtype in LOW and _cheap_low_ref(B, T, H, D, E):
        o_low, st_low = ref_low(q, k, v, slopes, scale, s0)
    check_close("o", o, o_ref, dtype, device, o_low)
    check_close("final_state", st, st_ref, dtype, device, st_low)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("case", FWD_CASES, ids=_fwd_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_matches_reference(device, case, dtype):
    _run_forward_check(case, dtype, device)


@pytest.mark.parametrize("case", FWD_CASES[:9] + FWD_CASES[-6:], ids=_fwd_case_id)
def test_forward_float64_cpu(case):
    _run_forward_check(case, F64, "cpu")


def test_float64_inputs_accept_float32_slopes():
    q, k, v, s0 = make_inputs(1, 100, 2, 8, 8, F64, "cpu")
    slopes32 = make_slopes(2, "cpu", F32)
    o, st = call(q, k, v, slopes32, 1.0, s0)
    assert o.dtype == F64 and st.dtype == F64
    o_ref, st_ref = ref64(q, k, v, slopes32, 1.0, s0)
    check_close("o", o, o_ref, F64, "cpu")
    check_close("final_state", st, st_ref, F64, "cpu")


@cuda_only
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("case", CUDA_ONLY_CASES, ids=_fwd_case_id)
def test_forward_long_cuda(case, dtype):
    _run_forward_check(case, dtype, "cuda")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_no_final_state_returns_none(device, dtype):
    q, k, v, s0 = make_inputs(2, 70, 3, 32, 16, dtype, device)
    slopes = make_slopes(3, device)
    o, st = call(q, k, v, slopes, 1.0, s0, final=False)
    assert st is None
    o2, st2 = call(q, k, v, slopes, 1.0, s0, final=True)
    assert st2 is not None
    check_close("o", o, ref64(q, k, v, slopes, 1.0, s0)[0], dtype, device)
    assert rel_err(o, o2) <= (fp32_tol(device) if dtype == F32 else 1e-2)


def test_scale_is_linear(device):
    q, k, v, s0 = make_inputs(2, 100, 2, 24, 20, F32, device)
    slopes = make_slopes(2, device)
    o1, st1 = call(q, k, v, slopes, 1.0, s0)
    o3, st3 = call(q, k, v, slopes, 0.125, s0)
    assert rel_err(o3, o1 * 0.125) <= fp32_tol(device)
    # the scale multiplies the output only, never the state
    assert rel_err(st3, st1) <= fp32_tol(device)
    check_close("o", o3, ref64(q, k, v, slopes, 0.125, s0)[0], F32, device)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
def test_extreme_slopes(device, dtype):
    """Huge slopes (lambda underflows to 0) and zero slopes: every exponent is <= 0, so
    nothing may overflow; a kernel that divides by lambda^p produces inf/NaN here."""
    B, T, H, D, E = 1, 200, 4, 32, 32
    q, k, v, s0 = make_inputs(B, T, H, D, E, dtype, device)
    slopes = torch.tensor([0.0, 1e-5, 30.0, 100.0], device=device)
    o, st = call(q, k, v, slopes, 0.2, s0)
    o_ref, st_ref = ref64(q, k, v, slopes, 0.2, s0)
    low = ref_low(q, k, v, slopes, 0.2, s0) if dtype in LOW else (None, None)
    check_close("o", o, o_ref, dtype, device, low[0])
    check_close("final_state", st, st_ref, dtype, device, low[1])
    if dtype == F32:
        _check_grads(q, k, v, slopes, s0, 0.2, None, dtype, device)


@pytest.mark.parametrize("dtype,mag", [(F32, 30.0), (BF16, 30.0), (F16, 3.0)], ids=str)
def test_large_magnitude_inputs(device, dtype, mag):
    B, T, H, D, E = 2, 300, 4, 64, 64
    q, k, v, s0 = make_inputs(B, T, H, D, E, dtype, device, mag=mag)
    s0 = s0 * mag * mag
    slopes = make_slopes(H, device)
    o, st = call(q, k, v, slopes, 1.0, s0)
    o_ref, st_ref = ref64(q, k, v, slopes, 1.0, s0)
    if dtype == F16:  # precondition: the exact result is representable in fp16
        assert o_ref.abs().max() < 6e4
    low = ref_low(q, k, v, slopes, 1.0, s0) if dtype in LOW else (None, None)
    check_close("o", o, o_ref, dtype, device, low[0])
    check_close("final_state", st, st_ref, dtype, device, low[1])


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_autocast_follows_input_dtype(device, dtype):
    q, k, v, s0 = make_inputs(1, 80, 2, 16, 16, F32, device)
    slopes = make_slopes(2, device)
    expected, _ = call(q, k, v, slopes, 1.0, s0)
    with torch.autocast(device_type=device, dtype=BF16 if dtype == BF16 else F16):
        o, st = call(q, k, v, slopes, 1.0, s0)
    assert o.dtype == F32 and st.dtype == F32
    assert rel_err(o, expected) <= fp32_tol(device)


# ------------------------------------------------------------------------------- gradients


def _check_grads(q, k, v, slopes, s0, scale, cu_seqlens, dtype, device, low_ratio=False):
    """Outputs and the gradients of all five inputs under random dO and dS_T vs the float64
    reference (and, with ``low_ratio``, the recurrence in the low precision). 16-bit inputs run
    twice: with the slope gradient (a float32 backward) and without it (the 16-bit kernels),
    both checked."""
    inputs = (q, k, v, slopes, s0)

    def op(f):
        return lambda q, k, v, sl, s0: f(q, k, v, sl, scale, s0, cu_seqlens)

    low = op(lightning_attn_recurrent) if low_ratio and dtype in LOW else None
    runs = [[True] * 5] + ([[True, True, True, False, True]] if dtype in LOW else [])
    for wrt in runs:
        entries = fwd_bwd(
            op(call), inputs, device, ref_fn=op(lightning_attn_parallel), ref_device=device,
            wrt=wrt, low_fn=low,
        )  # fmt: skip
        leaves = [t for t, w in zip(inputs, wrt, strict=True) if w]
        names = ["o", "final_state"]
        names += [n for n, w in zip(["dq", "dk", "dv", "dslopes", "dS0"], wrt, strict=True) if w]
        for i, (name, (g, gr, *gl)) in enumerate(zip(names, entries, strict=True)):
            # the slope gradient is a cancelling sum: no low-precision ratio for it
            gl = gl[0] if gl and name != "dslopes" else None
            if i >= 2:
                leaf = leaves[i - 2]
                assert g.shape == leaf.shape and g.dtype == leaf.dtype, (
                    f"{name}: {tuple(g.shape)} {g.dtype} vs input {tuple(leaf.shape)} {leaf.dtype}"
                )
            check_close(name, g, gr, dtype, device, gl)


# (B, T, H, D, E)
GRAD_CASES = [
    (2, 65, 3, 64, 48),
    (1, 300, 2, 128, 128),
    (1, 130, 2, 16, 40),
    (1, 129, 2, 256, 256),
    (1, 64, 2, 96, 33),
    (1, 1, 4, 32, 16),
]


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: "B{}-T{}-H{}-D{}-E{}".format(*c))
def test_gradients_match_reference(device, case, dtype):
    B, T, H, D, E = case
    q, k, v, s0 = make_inputs(B, T, H, D, E, dtype, device)
    slopes = make_slopes(H, device)
    _check_grads(q, k, v, slopes, s0, D**-0.5, None, dtype, device, low_ratio=T <= 130)


def test_gradients_long_float32(device):
    B, T, H, D, E = 1, 2048, 2, 64, 64
    q, k, v, s0 = make_inputs(B, T, H, D, E, F32, device)
    slopes = torch.tensor([0.0, 2.0**-6], device=device)
    _check_grads(q, k, v, slopes, s0, D**-0.5, None, F32, device)


# --------------------------------------------------------------------------------- varlen

VARLEN_LENS = [1, 5, 63, 64, 65, 130, 17]


def _cu(lens, device, dtype=torch.int32):
    cu = [0]
    for n in lens:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=dtype, device=device)


@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("with_state", [True, False], ids=["S0", "noS0"])
def test_varlen_matches_reference(device, dtype, with_state, cu_dtype):
    H, D, E = 3, 64, 40
    cu = _cu(VARLEN_LENS, device, cu_dtype)
    total, N = int(cu[-1]), len(VARLEN_LENS)
    q, k, v, s0 = make_inputs(1, total, H, D, E, dtype, device, n_state=N, with_state=with_state)
    slopes = make_slopes(H, device)
    o, st = call(q, k, v, slopes, 0.5, s0, cu)
    assert o.shape == (1, total, H, E) and st.shape == (N, H, D, E)
    o_ref, st_ref = ref64(q, k, v, slopes, 0.5, s0, cu)
    low = ref_low(q, k, v, slopes, 0.5, s0, cu) if dtype in LOW else (None, None)
    check_close("o", o, o_ref, dtype, device, low[0])
    check_close("final_state", st, st_ref, dtype, device, low[1])

    # every packed sequence equals the same sequence run on its own
    if dtype == F32:
        for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
            si = None if s0 is None else s0[i : i + 1]
            o_i, st_i = call(q[:, a:b], k[:, a:b], v[:, a:b], slopes, 0.5, si)
            assert rel_err(o[:, a:b], o_i) <= fp32_tol(device), f"sequence {i}"
            assert rel_err(st[i : i + 1], st_i) <= fp32_tol(device), f"sequence {i} state"


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_varlen_gradients(device, dtype):
    H, D, E = 2, 32, 48
    cu = _cu(VARLEN_LENS, device)
    total, N = int(cu[-1]), len(VARLEN_LENS)
    q, k, v, s0 = make_inputs(1, total, H, D, E, dtype, device, n_state=N)
    slopes = make_slopes(H, device)
    _check_grads(q, k, v, slopes, s0, 1.0, cu, dtype, device)


def test_varlen_only_short_sequences(device):
    """All sequences shorter than one block, many of them length 1."""
    lens = [1, 1, 2, 3, 1, 7, 1, 31, 1]
    H, D, E = 2, 16, 16
    cu = _cu(lens, device)
    q, k, v, s0 = make_inputs(1, int(cu[-1]), H, D, E, F32, device, n_state=len(lens))
    slopes = make_slopes(H, device)
    o, st = call(q, k, v, slopes, 1.0, s0, cu)
    o_ref, st_ref = ref64(q, k, v, slopes, 1.0, s0, cu)
    check_close("o", o, o_ref, F32, device)
    check_close("final_state", st, st_ref, F32, device)


def test_varlen_with_empty_sequence(device):
    """cu_seqlens may repeat a value (an empty sequence): its final state is its initial
    state (zeros without one), and the neighbours are unaffected."""
    lens = [10, 0, 70]
    H, D, E = 2, 8, 8
    cu = _cu(lens, device)
    q, k, v, s0 = make_inputs(1, 80, H, D, E, F32, device, n_state=3)
    slopes = make_slopes(H, device)
    o, st = call(q, k, v, slopes, 1.0, s0, cu)
    o_ref, st_ref = ref64(q, k, v, slopes, 1.0, s0, cu)
    check_close("o", o, o_ref, F32, device)
    check_close("final_state", st, st_ref, F32, device)
    assert torch.equal(st[1], s0[1])


# ------------------------------------------------------------------------- prefill + decode


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
@pytest.mark.parametrize("T,M", [(60, 10), (64, 3), (127, 2), (1, 70)])
def test_prefill_then_decode_equals_one_call(device, dtype, T, M):
    B, H, D, E = 2, 3, 64, 32
    q, k, v, s0 = make_inputs(B, T + M, H, D, E, dtype, device)
    slopes = make_slopes(H, device)
    o_full, st_full = call(q, k, v, slopes, 1.0, s0)

    outs = []
    o_pre, state = call(q[:, :T], k[:, :T], v[:, :T], slopes, 1.0, s0)
    outs.append(o_pre)
    for t in range(T, T + M):
        o_t, state = call(q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1], slopes, 1.0, state)
        assert o_t.shape == (B, 1, H, E)
        outs.append(o_t)
    o_inc = torch.cat(outs, dim=1)

    o_ref, st_ref = ref64(q, k, v, slopes, 1.0, s0)
    low = ref_low(q, k, v, slopes, 1.0, s0) if dtype in LOW else (None, None)
    check_close("o (prefill + decode)", o_inc, o_ref, dtype, device, low[0])
    check_close("final_state (prefill + decode)", state, st_ref, dtype, device, low[1])
    tol = fp32_tol(device) if dtype == F32 else 2e-2
    assert rel_err(o_inc, o_full) <= tol
    assert rel_err(state, st_full) <= tol


def test_decode_step_without_final_state(device):
    B, H, D, E = 3, 4, 128, 128
    q, k, v, s0 = make_inputs(B, 1, H, D, E, F32, device)
    slopes = make_slopes(H, device)
    o, st = call(q, k, v, slopes, 0.3, s0, final=False)
    assert st is None
    check_close("o", o, ref64(q, k, v, slopes, 0.3, s0)[0], F32, device)


def test_decode_varlen_one_token_per_sequence(device):
    """Decoding N packed sequences, one token each (cu_seqlens = 0..N) continues each state."""
    N, H, D, E = 4, 2, 16, 24
    lens = [20, 64, 3, 70]
    cu = _cu(lens, device)
    q, k, v, s0 = make_inputs(1, int(cu[-1]), H, D, E, F32, device, n_state=N)
    slopes = make_slopes(H, device)
    _, state = call(q, k, v, slopes, 1.0, s0, cu)
    qd, kd, vd, _ = make_inputs(1, N, H, D, E, F32, device, with_state=False)
    cu_dec = torch.arange(N + 1, dtype=torch.int32, device=device)
    o_dec, st_dec = call(qd, kd, vd, slopes, 1.0, state, cu_dec)
    # the same as decoding with batch = N
    o_b, st_b = call(qd.transpose(0, 1), kd.transpose(0, 1), vd.transpose(0, 1), slopes, 1.0, state)
    assert rel_err(o_dec, o_b.transpose(0, 1)) <= fp32_tol(device)
    assert rel_err(st_dec, st_b) <= fp32_tol(device)
    o_ref, st_ref = ref64(qd, kd, vd, slopes, 1.0, state, cu_dec)
    check_close("o", o_dec, o_ref, F32, device)
    check_close("final_state", st_dec, st_ref, F32, device)


# --------------------------------------------------------------------------------- strides


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_strided_inputs_equal_contiguous(device, dtype):
    """q as a transposed [B, H, T, D] tensor; k, v with stride-0 expanded heads."""
    B, T, H, D, E = 2, 150, 4, 32, 24
    q_bhtd = torch.randn(B, H, T, D, device=device).to(dtype)
    k1 = torch.randn(B, T, 1, D, device=device).to(dtype)
    v1 = torch.randn(B, T, 1, E, device=device).to(dtype)
    s0 = torch.randn(B, H, D, E, device=device)
    slopes = make_slopes(H, device)

    q_s = q_bhtd.detach().requires_grad_()
    k_s = k1.detach().requires_grad_()
    v_s = v1.detach().requires_grad_()
    q, k, v = q_s.transpose(1, 2), k_s.expand(B, T, H, D), v_s.expand(B, T, H, E)
    assert k.stride(2) == 0 and not q.is_contiguous()
    o_s, st_s = call(q, k, v, slopes, 1.0, s0)

    q_c = q.detach().contiguous().requires_grad_()
    k_c = k.detach().contiguous().requires_grad_()
    v_c = v.detach().contiguous().requires_grad_()
    o_c, st_c = call(q_c, k_c, v_c, slopes, 1.0, s0)

    tol = 1e-6 if dtype == F32 else 1e-3
    assert rel_err(o_s, o_c) <= tol
    assert rel_err(st_s, st_c) <= tol
    check_close("o", o_s, ref64(q, k, v, slopes, 1.0, s0)[0], dtype, device)

    do = torch.randn_like(o_c)
    dst = torch.randn_like(st_c)
    gs = torch.autograd.grad([o_s, st_s], [q_s, k_s, v_s], [do, dst])
    gc = torch.autograd.grad([o_c, st_c], [q_c, k_c, v_c], [do, dst])
    gtol = fp32_tol(device) if dtype == F32 else 1e-2
    assert rel_err(gs[0], gc[0].transpose(1, 2)) <= gtol
    assert rel_err(gs[1], gc[1].float().sum(2, keepdim=True)) <= gtol
    assert rel_err(gs[2], gc[2].float().sum(2, keepdim=True)) <= gtol


def test_non_unit_last_stride_is_handled(device):
    """A last-dim stride != 1 is not the kernels' layout: the wrapper copies, same result."""
    B, T, H, D, E = 1, 90, 2, 16, 16
    base = torch.randn(B, T, H, 2 * D, device=device)
    q = base[..., ::2]
    assert q.stride(-1) == 2
    _, k, v, s0 = make_inputs(B, T, H, D, E, F32, device)
    slopes = make_slopes(H, device)
    o, st = call(q, k, v, slopes, 1.0, s0)
    o_c, st_c = call(q.contiguous(), k, v, slopes, 1.0, s0)
    assert rel_err(o, o_c) <= 1e-6 and rel_err(st, st_c) <= 1e-6


def test_inputs_not_modified(device):
    B, T, H, D, E = 2, 100, 2, 16, 8
    q, k, v, s0 = make_inputs(B, T, H, D, E, F32, device)
    slopes = make_slopes(H, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, slopes, s0)]
    o, st = call(*leaves[:4], 1.0, leaves[4])
    torch.autograd.backward([o, st], [torch.randn_like(o), torch.randn_like(st)])
    for name, a, b in zip(
        ["q", "k", "v", "slopes", "s0"], leaves, (q, k, v, slopes, s0), strict=True
    ):
        assert torch.equal(a.detach(), b), f"{name} was modified"


def test_backward_with_broadcast_gradients(device):
    """loss = o.sum() + final_state.sum() hands the backward stride-0 (expanded) gradients."""
    B, T, H, D, E = 2, 100, 2, 16, 8
    q, k, v, s0 = make_inputs(B, T, H, D, E, F32, device)
    slopes = make_slopes(H, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, slopes, s0)]
    o, st = call(*leaves[:4], 1.0, leaves[4])
    grads = torch.autograd.grad(o.sum() + st.sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, slopes, s0)]
    o_r, st_r = lightning_attn_parallel(*ref_leaves[:4], 1.0, ref_leaves[4])
    ref_grads = torch.autograd.grad(o_r.sum() + st_r.sum(), ref_leaves)
    for name, g, gr in zip(["dq", "dk", "dv", "dslopes", "dS0"], grads, ref_grads, strict=True):
        check_close(name, g, gr, F32, device)


# ----------------------------------------------------------------------- NaN containment


def test_nan_does_not_leak_across_batch_heads_or_sequences(device):
    """NaN in the data propagates (it does not crash), but only within its own batch
    element / head / packed sequence."""
    B, T, H, D, E = 2, 150, 2, 16, 16
    q, k, v, s0 = make_inputs(B, T, H, D, E, F32, device)
    slopes = make_slopes(H, device)
    v = v.clone()
    v[1, 70, 1, 3] = float("nan")
    o, st = call(q, k, v, slopes, 1.0, s0)
    assert torch.isnan(o[1, :, 1]).any()
    o_ref, st_ref = ref64(q, k, v, slopes, 1.0, s0)
    check_close("o[b=0]", o[0], o_ref[0], F32, device)
    check_close("o[b=1, h=0]", o[1, :, 0], o_ref[1, :, 0], F32, device)
    check_close("state[b=0]", st[0], st_ref[0], F32, device)

    cu = _cu([40, 60, 50], device)
    q1, k1, v1, s01 = make_inputs(1, 150, H, D, E, F32, device, n_state=3)
    v1 = v1.clone()
    v1[0, 70, 0, 0] = float("inf")
    o1, st1 = call(q1, k1, v1, slopes, 1.0, s01, cu)
    ref1, rst1 = ref64(q1, k1, v1, slopes, 1.0, s01, cu)
    check_close("o[seq 0]", o1[:, :40], ref1[:, :40], F32, device)
    check_close("o[seq 2]", o1[:, 100:], ref1[:, 100:], F32, device)
    check_close("state[seq 0, 2]", st1[[0, 2]], rst1[[0, 2]], F32, device)
    assert not torch.isfinite(o1[:, 70:100, 0]).all()


# ---------------------------------------------------------------------------------- errors


def _valid(device, B=2, T=10, H=3, D=8, E=6, dtype=F32):
    q, k, v, s0 = make_inputs(B, T, H, D, E, dtype, device)
    return {"q": q, "k": k, "v": v, "slopes": make_slopes(H, device), "initial_state": s0}


def _bad(device, **overrides):
    args = _valid(device)
    for key, val in overrides.items():
        args[key] = val(args) if callable(val) else val
    return args


def _error_cases(device):
    d = device
    z = lambda *s, dt=F32: torch.zeros(*s, device=d, dtype=dt)  # noqa: E731
    return {
        "q-rank": (_bad(d, q=lambda a: a["q"][0]), r"\bq\b"),
        "k-rank": (_bad(d, k=lambda a: a["k"][None]), r"\bk\b"),
        "v-rank": (_bad(d, v=lambda a: a["v"][0]), r"\bv\b"),
        "q-not-tensor": (_bad(d, q=lambda a: a["q"].tolist()), r"\bq\b"),
        "k-batch": (_bad(d, k=z(3, 10, 3, 8)), r"\bk\b"),
        "v-batch": (_bad(d, v=z(3, 10, 3, 6)), r"\bv\b"),
        "k-time": (_bad(d, k=z(2, 11, 3, 8)), r"\bk\b"),
        "v-time": (_bad(d, v=z(2, 9, 3, 6)), r"\bv\b"),
        "k-heads": (_bad(d, k=z(2, 10, 4, 8)), r"\bk\b"),
        "k-one-head": (_bad(d, k=z(2, 10, 1, 8)), r"\bk\b"),
        "v-heads": (_bad(d, v=z(2, 10, 1, 6)), r"\bv\b"),
        "k-dim": (_bad(d, k=z(2, 10, 3, 9)), r"\bk\b"),
        "k-dtype": (_bad(d, k=lambda a: a["k"].to(BF16)), r"\bk\b"),
        "qkv-int32": (
            _bad(
                d,
                q=z(2, 10, 3, 8, dt=torch.int32),
                k=z(2, 10, 3, 8, dt=torch.int32),
                v=z(2, 10, 3, 6, dt=torch.int32),
            ),
            r"\bq\b",
        ),
        "slopes-len": (_bad(d, slopes=z(4)), r"slopes"),
        "slopes-2d": (_bad(d, slopes=z(1, 3)), r"slopes"),
        "slopes-int": (_bad(d, slopes=z(3, dt=torch.int32)), r"slopes"),
        "state-transposed": (_bad(d, initial_state=z(2, 3, 6, 8)), r"initial_state"),
        "state-batch": (_bad(d, initial_state=z(3, 3, 8, 6)), r"initial_state"),
        "state-rank": (_bad(d, initial_state=z(3, 8, 6)), r"initial_state"),
        "state-f16": (_bad(d, initial_state=z(2, 3, 8, 6, dt=F16)), r"initial_state"),
        "state-int": (_bad(d, initial_state=z(2, 3, 8, 6, dt=torch.int32)), r"initial_state"),
        "D-257": (
            _bad(d, q=z(2, 10, 3, 257), k=z(2, 10, 3, 257), initial_state=None),
            r"\b[qk]\b",
        ),
        "E-257": (_bad(d, v=z(2, 10, 3, 257), initial_state=None), r"\bv\b"),
    }


def _bf16_state_case(device):
    args = _valid(device, dtype=BF16)
    args["initial_state"] = args["initial_state"].to(BF16)
    return args


def _cu_cases(device):
    d = device

    def with_cu(cu, **kw):
        args = _valid(d, B=1, T=20)
        args["initial_state"] = None
        args["cu_seqlens"] = cu
        args.update(kw)
        return args

    i32 = lambda xs, dt=torch.int32: torch.tensor(xs, dtype=dt, device=d)  # noqa: E731
    return {
        "non-monotone": (with_cu(i32([0, 12, 8, 20])), "cu_seqlens"),
        "first-not-0": (with_cu(i32([2, 10, 20])), "cu_seqlens"),
        "last-short": (with_cu(i32([0, 10, 19])), "cu_seqlens"),
        "last-long": (with_cu(i32([0, 10, 21])), "cu_seqlens"),
        "float-dtype": (with_cu(torch.tensor([0.0, 10.0, 20.0], device=d)), "cu_seqlens"),
        "int16-dtype": (with_cu(i32([0, 10, 20], torch.int16)), "cu_seqlens"),
        "2d": (with_cu(i32([[0, 10, 20]])), "cu_seqlens"),
        "empty": (with_cu(i32([])), "cu_seqlens"),
        "batch-2": (
            {**_valid(d, B=2, T=20), "initial_state": None, "cu_seqlens": i32([0, 10, 20])},
            "cu_seqlens",
        ),
        "state-count": (
            with_cu(i32([0, 10, 20]), initial_state=torch.zeros(3, 3, 8, 6, device=d)),
            "initial_state",
        ),
    }


def _call_args(args):
    args = dict(args)
    q, k, v, slopes = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("slopes")
    return longattn.lightning_attn(q, k, v, slopes, output_final_state=True, **args)


@pytest.mark.parametrize("case", list(_error_cases("cpu")))
def test_bad_arguments_raise(device, case):
    args, match = _error_cases(device)[case]
    with pytest.raises((ValueError, TypeError), match=match):
        _call_args(args)


# cu_seqlens values that only a host read could reject.
_CU_VALUE_CASES = {"non-monotone", "first-not-0", "last-short", "last-long"}


@pytest.mark.parametrize("case", list(_cu_cases("cpu")))
def test_bad_cu_seqlens_raise(device, case):
    args, match = _cu_cases(device)[case]
    if device == "cuda" and case in _CU_VALUE_CASES:
        # On CUDA the values are never read on the host (no synchronisation); the kernels clamp
        # them into [0, T] so nothing outside the tensors is touched (docs/api/lightning.md).
        _, final_state = _call_args(args)
        torch.cuda.synchronize()
        assert torch.isfinite(final_state).all()
        return
    with pytest.raises((ValueError, TypeError), match=match):
        _call_args(args)


def test_bf16_initial_state_rejected(device):
    with pytest.raises((ValueError, TypeError), match="initial_state"):
        _call_args(_bf16_state_case(device))


@cuda_only
def test_cuda_only_errors():
    args = _valid("cuda", dtype=F64)
    with pytest.raises((ValueError, TypeError), match=r"\bq\b"):
        _call_args(args)
    for name, pattern in [
        ("k", r"\bk\b"),
        ("v", r"\bv\b"),
        ("slopes", "slopes"),
        ("initial_state", "initial_state"),
    ]:
        args = _valid("cuda")
        args[name] = args[name].cpu()
        with pytest.raises((ValueError, TypeError), match=pattern):
            _call_args(args)
    args = _valid("cuda", B=1, T=20)
    args["initial_state"] = None
    args["cu_seqlens"] = torch.tensor([0, 10, 20], dtype=torch.int32)  # on the CPU
    with pytest.raises((ValueError, TypeError), match="cu_seqlens"):
        _call_args(args)


def test_valid_after_errors_still_work(device):
    """Bad calls leave nothing broken behind: a valid call afterwards is still correct."""
    cases = _error_cases(device)
    for name in ("q-rank", "k-batch", "slopes-len", "state-batch", "D-257"):
        args = cases[name][0]
        with pytest.raises((ValueError, TypeError)):
            _call_args(args)
    args = _valid(device)
    o, st = _call_args(args)
    o_ref, st_ref = ref64(
        args["q"], args["k"], args["v"], args["slopes"], 1.0, args["initial_state"]
    )
    check_close("o", o, o_ref, F32, device)


@pytest.mark.parametrize("shape", [(1, 0), (0, 5)])
def test_empty_inputs_forward_and_backward(device, shape):
    """Empty batches or sequences: outputs are empty, the final state is the initial one, and
    the backward accepts torch's broadcast (stride-0) gradients of empty outputs."""
    B, T = shape
    q = torch.randn(B, T, 2, 3, device=device, requires_grad=True)
    s0 = torch.randn(B, 2, 3, 3, device=device, requires_grad=True)
    slopes = torch.tensor([0.1, 1.0], device=device)
    o, st = longattn.lightning_attn(q, q, q, slopes, initial_state=s0, output_final_state=True)
    assert o.shape == (B, T, 2, 3)
    torch.testing.assert_close(st, s0)
    (o.sum() + st.sum()).backward()
    assert q.grad.shape == q.shape
    torch.testing.assert_close(s0.grad, torch.ones_like(s0))


@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
@pytest.mark.parametrize("T", [68, 1000])
def test_slope_gradient_16bit_is_float32_accurate(device, dtype, T):
    """The slope gradient cancels terms ~T times larger than itself; from 16-bit inputs it must
    still match float64 (the 16-bit kernels alone were 61% off at T 68 on the H200)."""
    H, D, E = 2, 17, 16
    q, k, v, s0 = make_inputs(1, T, H, D, E, dtype, device)
    slopes = torch.tensor([1e-3, 0.05], device=device)
    entries = check_fwd_bwd(
        lambda q, k, v, sl, s0: call(q, k, v, sl, 0.25, s0), (q, k, v, slopes, s0), dtype, device,
        ref_fn=lambda q, k, v, sl, s0: lightning_attn_parallel(q, k, v, sl, 0.25, s0, None),
        ref_device=device, wrt=[False, False, False, True, False],
        names=["o", "final_state", "dslopes"],
        num_outputs=2, grad_tol=1e-3,
    )  # fmt: skip
    assert entries[2][0].dtype == slopes.dtype
