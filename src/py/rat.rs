//! Bindings of RAT chunked attention.

use crate::ops;
use pyo3::prelude::*;

/// Forward of RAT attention: writes `out`, `out_lo` (when given: out's rounding residual), `lse`
/// and the chunk-final `k_states`/`v_states`.
#[pyfunction]
#[pyo3(signature = (q, k, v, g, out, out_lo, lse, k_states, v_states, chunk_size, scale,
                    rope_theta, cu_seqlens, stream, scratch=None))]
#[allow(clippy::too_many_arguments)]
fn rat_fwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    g: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    out_lo: Option<&Bound<'_, PyAny>>,
    lse: &Bound<'_, PyAny>,
    k_states: &Bound<'_, PyAny>,
    v_states: &Bound<'_, PyAny>,
    chunk_size: i64,
    scale: f64,
    rope_theta: Option<f64>,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
    scratch: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    tensors!(stream; q, k, v, g, out, out_lo?, lse, k_states, v_states, cu_seqlens?);
    let scratch = Scratch::import(scratch, stream)?;
    let sc = scratch.as_ref().map(|s| s.views());
    py.detach(|| {
        ops::rat::forward(
            q,
            k,
            v,
            g,
            out,
            out_lo,
            lse,
            k_states,
            v_states,
            chunk_size,
            scale,
            rope_theta,
            cu_seqlens,
            sc.as_ref(),
            stream,
        )
    })
}

/// Backward of RAT attention: writes dq, dk, dv, dg (Δ from out + out_lo when out_lo is given).
#[pyfunction]
#[pyo3(signature = (q, k, v, g, out, out_lo, lse, k_states, v_states, grad_out, dq, dk, dv, dg,
                    chunk_size, scale, rope_theta, cu_seqlens, stream, scratch=None))]
#[allow(clippy::too_many_arguments)]
fn rat_bwd(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    g: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    out_lo: Option<&Bound<'_, PyAny>>,
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
    rope_theta: Option<f64>,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
    scratch: Option<&Bound<'_, PyAny>>,
) -> PyResult<()> {
    tensors!(stream; q, k, v, g, out, out_lo?, lse, k_states, v_states, grad_out, dq, dk, dv, dg,
             cu_seqlens?);
    let scratch = Scratch::import(scratch, stream)?;
    let sc = scratch.as_ref().map(|s| s.views());
    py.detach(|| {
        ops::rat::backward(
            q,
            k,
            v,
            g,
            out,
            out_lo,
            lse,
            k_states,
            v_states,
            grad_out,
            dq,
            dk,
            dv,
            dg,
            chunk_size,
            scale,
            rope_theta,
            cu_seqlens,
            sc.as_ref(),
            stream,
        )
    })
}

/// One-token decode step from a RAT cache (CUDA): writes `out`, updates the running state
/// `k_run`/`v_run` in place and, when the token ends its chunk, appends its rotated state to
/// `k_states`/`v_states` at slot `seen // chunk_size`.
#[pyfunction]
#[pyo3(signature = (q, k, v, g, out, k_run, v_run, k_states, v_states, partial, seen,
                    chunk_size, scale, rope_theta, stream))]
#[allow(clippy::too_many_arguments)]
fn rat_decode(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    g: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    k_run: &Bound<'_, PyAny>,
    v_run: &Bound<'_, PyAny>,
    k_states: &Bound<'_, PyAny>,
    v_states: &Bound<'_, PyAny>,
    partial: Option<&Bound<'_, PyAny>>,
    seen: i64,
    chunk_size: i64,
    scale: f64,
    rope_theta: Option<f64>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, v, g, out, k_run, v_run, k_states, v_states, partial?);
    py.detach(|| {
        ops::rat::decode(
            q, k, v, g, out, k_run, v_run, k_states, v_states, partial, seen, chunk_size, scale,
            rope_theta, stream,
        )
    })
}

/// The CUDA scratch buffers, passed from Python as a tuple
/// `(kr, ve, carry_k, carry_v[, delta, dks, dvs])`.
struct Scratch {
    tensors: Vec<crate::tensor::Tensor>,
}

impl Scratch {
    fn import(obj: Option<&Bound<'_, PyAny>>, stream: usize) -> PyResult<Option<Scratch>> {
        let Some(obj) = obj else { return Ok(None) };
        if obj.is_none() {
            return Ok(None);
        }
        let items: Vec<Bound<'_, PyAny>> = obj.extract()?;
        if items.len() != 4 && items.len() != 7 {
            return Err(ops::value_error(format!(
                "scratch: expected 4 or 7 tensors, got {}",
                items.len()
            )));
        }
        let names = ["kr", "ve", "carry_k", "carry_v", "delta", "dks", "dvs"];
        let tensors = items
            .iter()
            .zip(names)
            .map(|(t, name)| crate::tensor::import(t, name, stream))
            .collect::<PyResult<Vec<_>>>()?;
        Ok(Some(Scratch { tensors }))
    }

    fn views(&self) -> ops::rat::Scratch<'_> {
        let v = |i: usize| self.tensors.get(i).map(|t| &t.view);
        ops::rat::Scratch {
            kr: &self.tensors[0].view,
            ve: &self.tensors[1].view,
            carry_k: &self.tensors[2].view,
            carry_v: &self.tensors[3].view,
            delta: v(4),
            dks: v(5),
            dvs: v(6),
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(rat_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(rat_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(rat_decode, m)?)?;
    m.add("RAT_MAX_HEAD_DIM", ops::rat::MAX_HEAD_DIM)?;
    Ok(())
}
