//! Bindings of Native Sparse Attention (CPU kernels; CUDA tensors raise a clear error).

use crate::ops;
use crate::ops::nsa::{Branch, Selection};
use crate::tensor::{import, import_opt};
use pyo3::prelude::*;

/// Forward of one attention branch ("selected", "window" or "compressed"): writes out and lse.
/// `a`/`b`: block_size / window_size / (kernel_size, kernel_stride); `count` < 0: all entries.
#[pyfunction]
#[pyo3(signature = (kind, q, k, v, out, lse, block_indices, block_counts, count, a, b, scale,
                    cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn nsa_branch_fwd(
    py: Python<'_>,
    kind: &str,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    block_indices: Option<&Bound<'_, PyAny>>,
    block_counts: Option<&Bound<'_, PyAny>>,
    count: i64,
    a: usize,
    b: usize,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let q = import(q, "q", stream)?;
    let k = import(k, "k", stream)?;
    let v = import(v, "v", stream)?;
    let out = import(out, "out", stream)?;
    let lse = import(lse, "lse", stream)?;
    let idx = import_opt(block_indices, "block_indices", stream)?;
    let cnt = import_opt(block_counts, "block_counts", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let br = Branch {
        kind,
        block_indices: idx.as_ref().map(|t| &t.view),
        block_counts: cnt.as_ref().map(|t| &t.view),
        count,
        a,
        b,
    };
    let cu = cu.as_ref().map(|t| &t.view);
    py.detach(|| {
        ops::nsa::attn_forward(
            &br, &q.view, &k.view, &v.view, &out.view, &lse.view, scale, cu,
        )
    })
}

/// Backward of one attention branch: writes dq, dk, dv.
#[pyfunction]
#[pyo3(signature = (kind, q, k, v, out, lse, grad_out, dq, dk, dv, block_indices, block_counts,
                    count, a, b, scale, cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn nsa_branch_bwd(
    py: Python<'_>,
    kind: &str,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    grad_out: &Bound<'_, PyAny>,
    dq: &Bound<'_, PyAny>,
    dk: &Bound<'_, PyAny>,
    dv: &Bound<'_, PyAny>,
    block_indices: Option<&Bound<'_, PyAny>>,
    block_counts: Option<&Bound<'_, PyAny>>,
    count: i64,
    a: usize,
    b: usize,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let q = import(q, "q", stream)?;
    let k = import(k, "k", stream)?;
    let v = import(v, "v", stream)?;
    let out = import(out, "out", stream)?;
    let lse = import(lse, "lse", stream)?;
    let dout = import(grad_out, "grad_out", stream)?;
    let dq = import(dq, "dq", stream)?;
    let dk = import(dk, "dk", stream)?;
    let dv = import(dv, "dv", stream)?;
    let idx = import_opt(block_indices, "block_indices", stream)?;
    let cnt = import_opt(block_counts, "block_counts", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let br = Branch {
        kind,
        block_indices: idx.as_ref().map(|t| &t.view),
        block_counts: cnt.as_ref().map(|t| &t.view),
        count,
        a,
        b,
    };
    let cu = cu.as_ref().map(|t| &t.view);
    py.detach(|| {
        ops::nsa::attn_backward(
            &br, &q.view, &k.view, &v.view, &out.view, &lse.view, &dout.view, &dq.view, &dk.view,
            &dv.view, scale, cu,
        )
    })
}

/// Fused block selection: writes block_indices [B, T, Hkv, topk] int32.
#[pyfunction]
#[pyo3(signature = (q, k_cmp, lse, block_indices, kernel_size, kernel_stride, block_size, topk,
                    init_blocks, local_blocks, scale, cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn nsa_topk_blocks(
    py: Python<'_>,
    q: &Bound<'_, PyAny>,
    k_cmp: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    block_indices: &Bound<'_, PyAny>,
    kernel_size: usize,
    kernel_stride: usize,
    block_size: usize,
    topk: usize,
    init_blocks: usize,
    local_blocks: usize,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let q = import(q, "q", stream)?;
    let kc = import(k_cmp, "k_cmp", stream)?;
    let lse = import(lse, "lse", stream)?;
    let out = import(block_indices, "block_indices", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let sel = Selection {
        kernel_size,
        kernel_stride,
        block_size,
        topk,
        init_blocks,
        local_blocks,
    };
    let cu = cu.as_ref().map(|t| &t.view);
    py.detach(|| ops::nsa::topk(&sel, &q.view, &kc.view, &lse.view, &out.view, scale, cu))
}

/// Compression forward (mean when weight is None, else linear with optional pe).
#[pyfunction]
#[pyo3(signature = (x, weight, pe, out, kernel_size, kernel_stride, cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn nsa_compress_fwd(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    pe: Option<&Bound<'_, PyAny>>,
    out: &Bound<'_, PyAny>,
    kernel_size: usize,
    kernel_stride: usize,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let x = import(x, "x", stream)?;
    let w = import_opt(weight, "weight", stream)?;
    let pe = import_opt(pe, "pe", stream)?;
    let out = import(out, "out", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let (w, pe) = (w.as_ref().map(|t| &t.view), pe.as_ref().map(|t| &t.view));
    let cu = cu.as_ref().map(|t| &t.view);
    py.detach(|| {
        ops::nsa::compress_forward(&x.view, w, pe, &out.view, kernel_size, kernel_stride, cu)
    })
}

/// Compression backward: writes dx (and dweight, dpe when given).
#[pyfunction]
#[pyo3(signature = (x, weight, pe, grad_out, dx, dweight, dpe, kernel_size, kernel_stride,
                    cu_seqlens, stream))]
#[allow(clippy::too_many_arguments)]
fn nsa_compress_bwd(
    py: Python<'_>,
    x: &Bound<'_, PyAny>,
    weight: Option<&Bound<'_, PyAny>>,
    pe: Option<&Bound<'_, PyAny>>,
    grad_out: &Bound<'_, PyAny>,
    dx: &Bound<'_, PyAny>,
    dweight: Option<&Bound<'_, PyAny>>,
    dpe: Option<&Bound<'_, PyAny>>,
    kernel_size: usize,
    kernel_stride: usize,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    let x = import(x, "x", stream)?;
    let w = import_opt(weight, "weight", stream)?;
    let pe = import_opt(pe, "pe", stream)?;
    let dout = import(grad_out, "grad_out", stream)?;
    let dx = import(dx, "dx", stream)?;
    let dw = import_opt(dweight, "dweight", stream)?;
    let dpe = import_opt(dpe, "dpe", stream)?;
    let cu = import_opt(cu_seqlens, "cu_seqlens", stream)?;
    let (w, pe) = (w.as_ref().map(|t| &t.view), pe.as_ref().map(|t| &t.view));
    let (dw, dpe) = (dw.as_ref().map(|t| &t.view), dpe.as_ref().map(|t| &t.view));
    let cu = cu.as_ref().map(|t| &t.view);
    py.detach(|| {
        ops::nsa::compress_backward(
            &x.view,
            w,
            pe,
            &dout.view,
            &dx.view,
            dw,
            dpe,
            kernel_size,
            kernel_stride,
            cu,
        )
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(nsa_branch_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(nsa_branch_bwd, m)?)?;
    m.add_function(wrap_pyfunction!(nsa_topk_blocks, m)?)?;
    m.add_function(wrap_pyfunction!(nsa_compress_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(nsa_compress_bwd, m)?)?;
    m.add("NSA_MAX_HEAD_DIM", ops::nsa::MAX_HEAD_DIM)?;
    Ok(())
}
