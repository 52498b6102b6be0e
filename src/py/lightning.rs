//! Bindings of lightning attention.

use crate::{cpu, ops};
use pyo3::prelude::*;

/// Forward of lightning attention: writes `out` and `final_state`.
#[pyfunction]
#[pyo3(signature = (q, k, v, slopes, out, initial_state, final_state, scale, cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn lightning_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    slopes: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    initial_state: Option<&Bound<'_, PyAny>>,
    final_state: &Bound<'_, PyAny>,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, v, slopes, out, initial_state?, final_state, cu_seqlens?);
    py.detach(|| {
        ops::lightning::forward(
            q,
            k,
            v,
            slopes,
            out,
            initial_state,
            final_state,
            scale,
            cu_seqlens,
            stream,
        )
    })
}

/// Backward of lightning attention: writes dq, dk, dv, grad_initial_state and the slope partials.
#[pyfunction]
#[pyo3(signature = (q, k, v, slopes, grad_out, initial_state, grad_final_state, dq, dk, dv,
                    grad_initial_state, partial_q, partial_k, scale, cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn lightning_bwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    slopes: &Bound<'_, PyAny>,
    grad_out: &Bound<'_, PyAny>,
    initial_state: Option<&Bound<'_, PyAny>>,
    grad_final_state: Option<&Bound<'_, PyAny>>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    grad_initial_state: &Bound<'_, PyAny>,
    partial_q: &Bound<'_, PyAny>,
    partial_k: &Bound<'_, PyAny>,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, v, slopes, grad_out, initial_state?, grad_final_state?, dq, dk, dv,
             grad_initial_state, partial_q, partial_k, cu_seqlens?);
    py.detach(|| {
        ops::lightning::backward(
            q,
            k,
            v,
            slopes,
            grad_out,
            initial_state,
            grad_final_state,
            dq,
            dk,
            dv,
            grad_initial_state,
            partial_q,
            partial_k,
            scale,
            cu_seqlens,
            stream,
        )
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(lightning_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(lightning_bwd, m)?)?;
    m.add("DOT_SLOTS", cpu::lightning::DOT_SLOTS)?;
    m.add("MAX_HEAD_DIM", ops::lightning::MAX_HEAD_DIM)?;
    Ok(())
}
