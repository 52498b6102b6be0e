//! Bindings of Native Sparse Attention (CPU kernels; CUDA kernels for the attention branches).

use crate::ops;
use crate::ops::nsa::{Branch, CudaAux, Selection};
use pyo3::prelude::*;

/// Forward of one attention branch ("selected", "window" or "compressed"): writes out and lse
/// (and out_lo, the rounding residual of out, when given).
/// `a`/`b`: block_size / window_size / (kernel_size, kernel_stride); `count` < 0: all entries.
#[pyfunction]
/// CUDA only: `cmp_off`, the selected-attention list plan (`entries`, `list_off`, `chunk_off`,
/// `chunk_tokens`; KV-outer order when given) and its partials (`part_o`, `part_lse`).
#[pyo3(signature = (kind, q, k, v, out, out_lo, lse, block_indices, block_counts, count, a, b,
                    scale, cu_seqlens, stream, cmp_off=None, entries=None, list_off=None,
                    chunk_off=None, part_o=None, part_lse=None, chunk_tokens=0))]
#[allow(clippy::too_many_arguments)]
fn nsa_branch_fwd(
    py: Python<'_>,
    kind: &str,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    out_lo: Option<&Bound<'_, PyAny>>,
    lse: &Bound<'_, PyAny>,
    block_indices: Option<&Bound<'_, PyAny>>,
    block_counts: Option<&Bound<'_, PyAny>>,
    count: i64,
    a: usize,
    b: usize,
    scale: f64,
    cu_seqlens: Option<&Bound<'_, PyAny>>,
    stream: usize,
    cmp_off: Option<&Bound<'_, PyAny>>,
    entries: Option<&Bound<'_, PyAny>>,
    list_off: Option<&Bound<'_, PyAny>>,
    chunk_off: Option<&Bound<'_, PyAny>>,
    part_o: Option<&Bound<'_, PyAny>>,
    part_lse: Option<&Bound<'_, PyAny>>,
    chunk_tokens: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, v, out, out_lo?, lse, block_indices?, block_counts?, cu_seqlens?,
             cmp_off?, entries?, list_off?, chunk_off?, part_o?, part_lse?);
    let br = Branch {
        kind,
        block_indices,
        block_counts,
        count,
        a,
        b,
    };
    let aux = CudaAux {
        cmp_off,
        entries,
        list_off,
        chunk_off,
        part_o,
        part_lse,
        chunk_tokens,
        stream,
        ..Default::default()
    };
    py.detach(|| ops::nsa::attn_forward(&br, q, k, v, out, out_lo, lse, scale, cu_seqlens, &aux))
}

/// Backward of one attention branch: writes dq, dk, dv. `out_lo`: the forward's rounding
/// residual of out (None: Δ from out alone).
#[pyfunction]
/// CUDA only: `delta` ([B, T, Hq] float32 scratch), `cmp_off`, and for selected attention the
/// list plan (`entries`, `list_off`, `chunk_off`, `split_off`, `scratch`, `chunk_tokens`) and,
/// for small groups, the KV-outer dQ partials (`part_dq`); for the window on Hopper, the row table
/// (`rowinfo`, [B·Hq, 3, T rounded up to 64] float32 scratch).
#[pyo3(signature = (kind, q, k, v, out, out_lo, lse, grad_out, dq, dk, dv, block_indices,
                    block_counts, count, a, b, scale, cu_seqlens, stream, delta=None, cmp_off=None,
                    entries=None, list_off=None, chunk_off=None, split_off=None, scratch=None,
                    part_dq=None, rowinfo=None, chunk_tokens=0))]
#[allow(clippy::too_many_arguments)]
fn nsa_branch_bwd(
    py: Python<'_>,
    kind: &str,
    q: &Bound<'_, PyAny>,
    k: &Bound<'_, PyAny>,
    v: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    out_lo: Option<&Bound<'_, PyAny>>,
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
    delta: Option<&Bound<'_, PyAny>>,
    cmp_off: Option<&Bound<'_, PyAny>>,
    entries: Option<&Bound<'_, PyAny>>,
    list_off: Option<&Bound<'_, PyAny>>,
    chunk_off: Option<&Bound<'_, PyAny>>,
    split_off: Option<&Bound<'_, PyAny>>,
    scratch: Option<&Bound<'_, PyAny>>,
    part_dq: Option<&Bound<'_, PyAny>>,
    rowinfo: Option<&Bound<'_, PyAny>>,
    chunk_tokens: usize,
) -> PyResult<()> {
    tensors!(stream; q, k, v, out, out_lo?, lse, grad_out, dq, dk, dv, block_indices?, block_counts?,
             cu_seqlens?, delta?, cmp_off?, entries?, list_off?, chunk_off?, split_off?,
             scratch?, part_dq?, rowinfo?);
    let br = Branch {
        kind,
        block_indices,
        block_counts,
        count,
        a,
        b,
    };
    let aux = CudaAux {
        cmp_off,
        entries,
        list_off,
        chunk_off,
        split_off,
        delta,
        scratch,
        part_dq,
        rowinfo,
        chunk_tokens,
        stream,
        ..Default::default()
    };
    py.detach(|| {
        ops::nsa::attn_backward(
            &br, q, k, v, out, out_lo, lse, grad_out, dq, dk, dv, scale, cu_seqlens, &aux,
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
    tensors!(stream; q, k_cmp, lse, block_indices, cu_seqlens?);
    let sel = Selection {
        kernel_size,
        kernel_stride,
        block_size,
        topk,
        init_blocks,
        local_blocks,
    };
    py.detach(|| {
        ops::nsa::topk(
            &sel,
            q,
            k_cmp,
            lse,
            block_indices,
            scale,
            cu_seqlens,
            stream,
        )
    })
}

/// Compression forward (mean when weight is None, else linear with optional pe).
/// `cu_seqlens_cmp`: the compressed offsets (required with cu_seqlens on CUDA).
#[pyfunction]
#[pyo3(signature = (x, weight, pe, out, kernel_size, kernel_stride, cu_seqlens, cu_seqlens_cmp,
                    stream))]
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
    cu_seqlens_cmp: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; x, weight?, pe?, out, cu_seqlens?, cu_seqlens_cmp?);
    py.detach(|| {
        ops::nsa::compress_forward(
            x,
            weight,
            pe,
            out,
            kernel_size,
            kernel_stride,
            cu_seqlens,
            cu_seqlens_cmp,
            stream,
        )
    })
}

/// Compression backward: writes dx (and dweight, dpe when given).
#[pyfunction]
#[pyo3(signature = (x, weight, pe, grad_out, dx, dweight, dpe, kernel_size, kernel_stride,
                    cu_seqlens, cu_seqlens_cmp, scratch, stream))]
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
    cu_seqlens_cmp: Option<&Bound<'_, PyAny>>,
    scratch: Option<&Bound<'_, PyAny>>,
    stream: usize,
) -> PyResult<()> {
    tensors!(stream; x, weight?, pe?, grad_out, dx, dweight?, dpe?, cu_seqlens?, cu_seqlens_cmp?,
             scratch?);
    py.detach(|| {
        ops::nsa::compress_backward(
            x,
            weight,
            pe,
            grad_out,
            dx,
            dweight,
            dpe,
            kernel_size,
            kernel_stride,
            cu_seqlens,
            cu_seqlens_cmp,
            scratch,
            stream,
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
