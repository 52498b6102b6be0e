//! Bindings of lightning attention.

use crate::tensor::{import, import_opt};
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
    let q = import(q, "q", stream)?;
    let k = import(k, "k", stream)?;
    let v = import(v, "v", stream)?;
    let slopes = import(slopes, "slopes", stream)?;
    let out = import(out, "out", stream)?;
    let s0 = import_opt(initial_state, "initial_state", stream)?;
    let st = import(final_state, "final_state", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let (s0, cu) = (s0.as_ref().map(|t| &t.view), cu.as_ref().map(|t| &t.view));
    py.detach(|| {
        ops::lightning::forward(
            &q.view,
            &k.view,
            &v.view,
            &slopes.view,
            &out.view,
            s0,
            &st.view,
            scale,
            cu,
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
    let q = import(q, "q", stream)?;
    let k = import(k, "k", stream)?;
    let v = import(v, "v", stream)?;
    let slopes = import(slopes, "slopes", stream)?;
    let dout = import(grad_out, "grad_out", stream)?;
    let s0 = import_opt(initial_state, "initial_state", stream)?;
    let dst = import_opt(grad_final_state, "grad_final_state", stream)?;
    let dq = import(dq, "dq", stream)?;
    let dk = import(dk, "dk", stream)?;
    let dv = import(dv, "dv", stream)?;
    let ds0 = import(grad_initial_state, "grad_initial_state", stream)?;
    let pq = import(partial_q, "partial_q", stream)?;
    let pk = import(partial_k, "partial_k", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let (s0, dst) = (s0.as_ref().map(|t| &t.view), dst.as_ref().map(|t| &t.view));
    let cu = cu.as_ref().map(|t| &t.view);
    py.detach(|| {
        ops::lightning::backward(
            &q.view,
            &k.view,
            &v.view,
            &slopes.view,
            &dout.view,
            s0,
            dst,
            &dq.view,
            &dk.view,
            &dv.view,
            &ds0.view,
            &pq.view,
            &pk.view,
            scale,
            cu,
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
