//! Bindings of RAT chunked attention.

use crate::ops;
use pyo3::prelude::*;

/// Forward of RAT attention: writes `out`, `lse` and the chunk-final `k_states`/`v_states`.
#[pyfunction]
#[pyo3(signature = (q, k, v, g, out, lse, k_states, v_states, chunk_size, scale, rope_base,
                    cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn rat_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    g: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    k_states: &Bound<'_, PyAny>,
    v_states: &Bound<'_, PyAny>,
    chunk_size: i64,
    scale: f64,
    rope_base: Option<f64>,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, v, g, out, lse, k_states, v_states, cu_seqlens?);
    py.detach(|| {
        ops::rat::forward(
            q, k, v, g, out, lse, k_states, v_states, chunk_size, scale, rope_base, cu_seqlens,
        )
    })
}

/// Backward of RAT attention: writes dq, dk, dv, dg.
#[pyfunction]
#[pyo3(signature = (q, k, v, g, out, lse, k_states, v_states, grad_out, dq, dk, dv, dg,
                    chunk_size, scale, rope_base, cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn rat_bwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    g: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    k_states: &Bound<'_, PyAny>,
    v_states: &Bound<'_, PyAny>,
    grad_out: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    dg: &Bound<'_, PyAny>,
    chunk_size: i64,
    scale: f64,
    rope_base: Option<f64>,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, v, g, out, lse, k_states, v_states, grad_out, dq, dk, dv, dg,
             cu_seqlens?);
    py.detach(|| {
        ops::rat::backward(
            q, k, v, g, out, lse, k_states, v_states, grad_out, dq, dk, dv, dg, chunk_size, scale,
            rope_base, cu_seqlens,
        )
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rat_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(rat_bwd, m)?)?;
    m.add("RAT_MAX_HEAD_DIM", ops::rat::MAX_HEAD_DIM)?;
    Ok(())
}
