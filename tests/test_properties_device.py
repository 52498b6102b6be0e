"""Property-based tests (hypothesis) of every op on CUDA against the float64 CPU references.

The cases of tests/property_cases.py (the CPU suite's) on a wide target: float32, bfloat16 and
float16 inputs on the GPU, T up to 300 across the 64- and 128-token tiles, head dims up to each
op's CUDA limit, chunk/block/window sizes around 64 (landmark blocks up to 64), GQA groups up to
16 (both selected-attention loop orders), transposed and stride-0 layouts, varlen with empty and
one-token sequences. Outputs and gradients (of every dtype) are compared with the float64
reference on the CPU, computed from the same rounded inputs: relative error within 1e-4
(float32) or 3e-2 (bfloat16/float16), finite wherever the reference is.

Budget: ``LONGATTN_CUDA_HYPOTHESIS_EXAMPLES`` examples per op (default 40), derandomized, no
shrinking (a failure reports the drawn example as generated; a GPU run has no time to shrink).
Every test runs twice: ``[cuda-…]`` on the GPU (marked cuda, skipped without one) and
``[cpu-…]``, the same harness with the CPU kernels, T ≤ 80 and ``LONGATTN_CPU_HARNESS_EXAMPLES``
examples (default 3), so that CI checks the harness itself. The device run selects ``-k cuda``.
"""

from __future__ import annotations

import os

import longattn as la
import property_cases as C
import pytest
import torch
from harness import BF16, F16, F32, HAS_CUDA, NEEDS_CUDA
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from longattn.reference import landmark as RL
from longattn.reference import lightning as RLi
from longattn.reference import rat as RR

DTYPES = (F32, BF16, F16)
CUDA = C.Target(device="cuda", dtypes=DTYPES, grad_dtypes=DTYPES, wide=True, max_t=300)
# the same draws on the CPU kernels, with shorter sequences (the references dominate the time)
CPU_HARNESS = C.Target(device="cpu", dtypes=DTYPES, grad_dtypes=DTYPES, wide=True, max_t=80)

TARGETS = [
    pytest.param(
        CUDA,
        id="cuda",
        marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)],
    ),
    pytest.param(CPU_HARNESS, id="cpu"),
]
EXAMPLES = {
    "cuda": int(os.environ.get("LONGATTN_CUDA_HYPOTHESIS_EXAMPLES", "40")),
    "cpu": int(os.environ.get("LONGATTN_CPU_HARNESS_EXAMPLES", "3")),
}


def run_examples(case, tgt: C.Target):
    @settings(
        max_examples=EXAMPLES[tgt.device],
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def property_test(data):
        case(data, tgt)
        if tgt.device == "cuda":
            torch.cuda.synchronize()  # a launch error surfaces in this example

    property_test()


@pytest.mark.parametrize("case", C.CASES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("tgt", TARGETS)
def test_vs_float64(tgt, case):
    run_examples(case, tgt)


# ----------------------------------------------------------------------------- NaN / Inf


def poisoned(gen, B, T, H, D, dtype, tgt):
    """q with NaN at (b 0, t T − 3, head 0) and +Inf at (b B − 1, t 70, last head)."""
    x = gen.randn(B, T, H, D)
    x[0, T - 3, 0, 1] = float("nan")
    x[B - 1, 70, H - 1, 0] = float("inf")
    return C.make_arg(x, dtype, tgt.device)


def nan_lightning(gen, dtype, tgt):
    B, T, H, D = 2, 150, 2, 32
    q = poisoned(gen, B, T, H, D, dtype, tgt)
    k, v = (gen.bhtd(B, T, H, D, dtype, "contig", mag=0.5) for _ in range(2))
    slopes = gen.arg(gen.rand(H), F32)
    out, _ = la.lightning_attn(q.x, k.x, v.x, slopes.x)
    ref, _ = RLi.lightning_attn_recurrent(*C.refs(q, k, v, slopes), 1.0)
    return out, ref


def nan_rat(gen, dtype, tgt):
    B, T, H, D = 2, 150, 2, 32
    q = poisoned(gen, B, T, H, D, dtype, tgt)
    k, v = (gen.bhtd(B, T, H, D, dtype, "contig") for _ in range(2))
    g = gen.arg(torch.sigmoid(gen.randn(B, T, H, D)), dtype)
    out = la.rat_attn(q.x, k.x, v.x, g.x, chunk_size=16, rope_theta=10000.0)
    ref = RR.rat_attn_reference(*C.refs(q, k, v, g), chunk_size=16, rope_theta=10000.0)
    return out, ref


def nan_landmark(gen, dtype, tgt):
    B, T, Hq, Hkv, D = 2, 150, 4, 2, 32
    q = poisoned(gen, B, T, Hq, D, dtype, tgt)
    k, v = (gen.bhtd(B, T, Hkv, D, dtype, "contig") for _ in range(2))
    out = la.landmark_attn(q.x, k.x, v.x, block_size=16)
    ref = RL.landmark_attn_reference(*C.refs(q, k, v), block_size=16)
    return out, ref


def nan_nsa(gen, dtype, tgt):
    # one query head per kv head: a poisoned row then spoils the selection of its own row only
    B, T, H, D, ks, stride, bs = 2, 150, 2, 32, 8, 4, 16
    q = poisoned(gen, B, T, H, D, dtype, tgt)
    k, v = (gen.bhtd(B, T, H, D, dtype, "contig") for _ in range(2))
    kc, vc = C.compressed_kv(gen, B, T, None, ks, stride, H, D, D, dtype, "contig", "contig")
    gates = [gen.arg(torch.sigmoid(gen.randn(B, T, H)), dtype) for _ in range(3)]
    kw = dict(kernel_size=ks, kernel_stride=stride, block_size=bs, topk=3, window_size=40)
    out = la.nsa_attn(q.x, k.x, v.x, *(g.x for g in gates), k_cmp=kc.x, v_cmp=vc.x, **kw)
    ref = C.nsa_attn_ref(*C.refs(q, k, v), C.refs(*gates), kc.ref, vc.ref, ks, stride, bs, 3, 40,
                         None, None)  # fmt: skip
    return out, ref


@pytest.mark.parametrize("family", [nan_lightning, nan_rat, nan_landmark, nan_nsa],
                         ids=lambda f: f.__name__.removeprefix("nan_"))  # fmt: skip
@pytest.mark.parametrize("tgt", TARGETS)
def test_nan_inf_in_q(tgt, family):
    """NaN/+Inf in q: no exception, the rows that read it are non-finite like the float64
    reference's, every other row finite and close; the backward runs to the end."""
    dtype = BF16
    out, ref = family(C.Gen(0, tgt.device), dtype, tgt)
    nonfinite = ~torch.isfinite(ref).all(-1)
    assert nonfinite.any()
    assert torch.equal(~torch.isfinite(out.cpu()).all(-1), nonfinite)
    C.assert_close(out[~nonfinite.to(out.device)], ref[~nonfinite], dtype, "finite rows")
    out.float().sum().backward()
    if tgt.device == "cuda":
        torch.cuda.synchronize()
