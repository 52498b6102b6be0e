//! Bindings of landmark attention.

use crate::ops;
use pyo3::prelude::*;

/// Forward of landmark attention: writes `out`, `out_lo` (when given: out's rounding residual)
/// and `lse`.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, out_lo, lse, block_indices, block_size, scale, cu_seqlens,
                    stream))]
#[allow(clippy::too_many_arguments)]
fn landmark_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    out_lo: Option<&Bound<'_, PyAny>>,
    lse: &Bound<'_, PyAny>,
    block_indices: Option<&Bound<'_, PyAny>>,
    block_size: i64,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, v, out, out_lo?, lse, block_indices?, cu_seqlens?);
    py.detach(|| {
        ops::landmark::forward(
            q,
            k,
            v,
            out,
            out_lo,
            lse,
            block_indices,
            block_size,
            scale,
            cu_seqlens,
            stream,
        )
    })
}

/// Backward of landmark attention: writes dq, dk, dv.
#[pyfunction]
#[pyo3(signature = (q, k, v, grad_out, lse, delta, dq, dk, dv, block_indices, block_size, scale,
                    cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn landmark_bwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    grad_out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    delta: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    block_indices: Option<&Bound<'_, PyAny>>,
    block_size: i64,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, v, grad_out, lse, delta, dq, dk, dv, block_indices?, cu_seqlens?);
    py.detach(|| {
        ops::landmark::backward(
            q,
            k,
            v,
            grad_out,
            lse,
            delta,
            dq,
            dk,
            dv,
            block_indices,
            block_size,
            scale,
            cu_seqlens,
            stream,
        )
    })
}

/// Top-k landmark blocks per (token, kv head): writes `out` (int32).
#[pyfunction]
#[pyo3(signature = (q, k, out, block_size, scale, cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn landmark_topk(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    block_size: i64,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, out, cu_seqlens?);
    py.detach(|| ops::landmark::topk_blocks(q, k, out, block_size, scale, cu_seqlens, stream))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(landmark_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(landmark_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(landmark_topk, m)?)?;
    m.add("LANDMARK_MAX_HEAD_DIM", ops::landmark::MAX_HEAD_DIM)?;
    Ok(())
}
