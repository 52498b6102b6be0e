"""Property-based tests (hypothesis): every CPU op against its float64 reference.

Random batch sizes (0 where the op allows it), lengths (0 and 1 included), heads and GQA ratios,
odd head dims, block / chunk / window sizes, float64 and float32, strided ``[B, H, T, D]``
views (``.transpose(1, 2)``) and stride-0 expanded heads, packed batches with empty and
one-token sequences. Forward within 1e-10 (float64) / 1e-4 (float32) relative error; float64
gradients against the reference's autograd. The cases live in tests/property_cases.py, shared
with the CUDA suite (tests/test_properties_device.py).

Budget: ``LONGATTN_HYPOTHESIS_EXAMPLES`` examples per test (default 15), derandomized so CI
is reproducible; raise it for a soak run, e.g. ``LONGATTN_HYPOTHESIS_EXAMPLES=500``.
"""

from __future__ import annotations

import os

import longattn as la
import property_cases as C
import pytest
import torch
from harness import F32, F64
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from longattn.reference import landmark as RL
from longattn.reference import nsa as RN
from longattn.reference import rat as RR

EXAMPLES = int(os.environ.get("LONGATTN_HYPOTHESIS_EXAMPLES", "15"))
CPU = C.Target(device="cpu", dtypes=(F64, F32), grad_dtypes=(F64,))

prop = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@prop
@given(st.data())
def test_lightning(data):
    C.lightning(data, CPU)


@prop
@given(st.data())
def test_rat(data):
    C.rat(data, CPU)


@prop
@given(st.data())
def test_landmark_attn(data):
    C.landmark_attn(data, CPU)


@prop
@given(st.data())
def test_landmark_topk_blocks(data):
    C.landmark_topk_blocks(data, CPU)


@prop
@given(st.data())
def test_nsa_compress(data):
    C.nsa_compress(data, CPU)


@prop
@given(st.data())
def test_nsa_compressed_attn(data):
    C.nsa_compressed_attn(data, CPU)


@prop
@given(st.data())
def test_nsa_topk_blocks(data):
    C.nsa_topk_blocks(data, CPU)


@prop
@given(st.data())
def test_nsa_selected_attn(data):
    C.nsa_selected_attn(data, CPU)


@prop
@given(st.data())
def test_sliding_window_attn(data):
    C.sliding_window_attn(data, CPU)


@prop
@given(st.data())
def test_nsa_attn(data):
    C.nsa_attn(data, CPU)


def test_empty_batch_references_and_ops():
    """Regression: the landmark, rat and NSA references crashed (torch.stack of nothing) for
    B = 0 with T > 0; the ops return empty outputs of the right shape."""
    q = torch.randn(0, 3, 2, 4, dtype=F64)
    g = torch.sigmoid(q)
    assert RR.rat_attn_reference(q, q, q, g, chunk_size=2).shape == (0, 3, 2, 4)
    assert la.rat_attn(q, q, q, g, chunk_size=2).shape == (0, 3, 2, 4)
    assert RL.landmark_attn_reference(q, q, q, block_size=2).shape == (0, 3, 2, 4)
    assert la.landmark_attn(q, q, q, block_size=2).shape == (0, 3, 2, 4)
    assert RN.sliding_window_attn_reference(q, q, q, window_size=2).shape == (0, 3, 2, 4)
    assert la.sliding_window_attn(q, q, q, window_size=2).shape == (0, 3, 2, 4)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_float32_inputs_keep_dtype(dtype):
    """Spot check outside hypothesis: outputs keep the input dtype for every op."""
    q = torch.randn(1, 5, 2, 4, dtype=dtype)
    assert la.sliding_window_attn(q, q, q, window_size=2).dtype == dtype
    assert la.rat_attn(q, q, q, torch.sigmoid(q), chunk_size=2).dtype == dtype
    assert la.landmark_attn(q, q, q, block_size=2).dtype == dtype
    assert la.lightning_attn(q, q, q, torch.ones(2, dtype=dtype))[0].dtype == dtype
