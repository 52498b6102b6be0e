//! Bindings of RAT chunked attention.

use crate::ops;
use crate::tensor::{import, import_opt};
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
    let q = import(q, "q", stream)?;
    let k = import(k, "k", stream)?;
    let v = import(v, "v", stream)?;
    let g = import(g, "g", stream)?;
    let out = import(out, "out", stream)?;
    let lse = import(lse, "lse", stream)?;
    let ks = import(k_states, "k_states", stream)?;
    let vs = import(v_states, "v_states", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let cu = cu.as_ref().map(|t| &t.view);
    py.detach(|| {
        ops::rat::forward(
            &q.view, &k.view, &v.view, &g.view, &out.view, &lse.view, &ks.view, &vs.view,
            chunk_size, scale, rope_base, cu,
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
    let q = import(q, "q", stream)?;
    let k = import(k, "k", stream)?;
    let v = import(v, "v", stream)?;
    let g = import(g, "g", stream)?;
    let out = import(out, "out", stream)?;
    let lse = import(lse, "lse", stream)?;
    let ks = import(k_states, "k_states", stream)?;
    let vs = import(v_states, "v_states", stream)?;
    let dout = import(grad_out, "grad_out", stream)?;
    let dq = import(dq, "dq", stream)?;
    let dk = import(dk, "dk", stream)?;
    let dv = import(dv, "dv", stream)?;
    let dg = import(dg, "dg", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let cu = cu.as_ref().map(|t| &t.view);
    py.detach(|| {
        ops::rat::backward(
            &q.view, &k.view, &v.view, &g.view, &out.view, &lse.view, &ks.view, &vs.view,
            &dout.view, &dq.view, &dk.view, &dv.view, &dg.view, chunk_size, scale, rope_base, cu,
        )
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rat_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(rat_bwd, m)?)?;
    m.add("RAT_MAX_HEAD_DIM", ops::rat::MAX_HEAD_DIM)?;
    Ok(())
}
