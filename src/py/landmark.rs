//! Bindings of landmark attention.

use crate::ops;
use crate::tensor::{import, import_opt};
use pyo3::prelude::*;

/// Forward of landmark attention: writes `out` and `lse`.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, block_indices, block_size, scale, cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn landmark_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    block_indices: Option<&Bound<'_, PyAny>>,
    block_size: i64,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let q = import(q, "q", stream)?;
    let k = import(k, "k", stream)?;
    let v = import(v, "v", stream)?;
    let out = import(out, "out", stream)?;
    let lse = import(lse, "lse", stream)?;
    let bi = import_opt(block_indices, "block_indices", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let (bi, cu) = (bi.as_ref().map(|t| &t.view), cu.as_ref().map(|t| &t.view));
    py.detach(|| {
        ops::landmark::forward(
            &q.view, &k.view, &v.view, &out.view, &lse.view, bi, block_size, scale, cu,
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
    let q = import(q, "q", stream)?;
    let k = import(k, "k", stream)?;
    let v = import(v, "v", stream)?;
    let dout = import(grad_out, "grad_out", stream)?;
    let lse = import(lse, "lse", stream)?;
    let delta = import(delta, "delta", stream)?;
    let dq = import(dq, "dq", stream)?;
    let dk = import(dk, "dk", stream)?;
    let dv = import(dv, "dv", stream)?;
    let bi = import_opt(block_indices, "block_indices", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let (bi, cu) = (bi.as_ref().map(|t| &t.view), cu.as_ref().map(|t| &t.view));
    py.detach(|| {
        ops::landmark::backward(
            &q.view,
            &k.view,
            &v.view,
            &dout.view,
            &lse.view,
            &delta.view,
            &dq.view,
            &dk.view,
            &dv.view,
            bi,
            block_size,
            scale,
            cu,
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
    let q = import(q, "q", stream)?;
    let k = import(k, "k", stream)?;
    let out = import(out, "out", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let cu = cu.as_ref().map(|t| &t.view);
    py.detach(|| ops::landmark::topk_blocks(&q.view, &k.view, &out.view, block_size, scale, cu))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(landmark_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(landmark_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(landmark_topk, m)?)?;
    m.add("LANDMARK_MAX_HEAD_DIM", ops::landmark::MAX_HEAD_DIM)?;
    Ok(())
}
