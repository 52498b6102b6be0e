//! Native Sparse Attention: argument checks and dispatch (CPU kernels; CUDA comes later).

use super::{
    accumulator_dtype, check_cu_seqlens, expect_device, expect_dtype, expect_shape, expect_tensor,
    expect_unit_last_stride, read_cu_seqlens, value_error,
};
use crate::cpu::nsa::{
    attn_bwd, attn_fwd, compress_bwd, compress_fwd, num_windows, topk_blocks, AttnBwd, AttnFwd,
    Compress, CompressBwd, Counts, KeySet, NsaSeq, TopK,
};
use crate::tensor::{DType, Device, View};
use pyo3::PyErr;

pub const MAX_HEAD_DIM: usize = 256;
const ANY: usize = usize::MAX;
const FLOATS: &[DType] = &[DType::F64, DType::F32, DType::F16, DType::BF16];
const INTS: &[DType] = &[DType::I32, DType::I64];

/// Rank 4, float dtype, CPU device, unit last stride; returns the shape.
fn expect_tokens_tensor(t: &View, name: &str, op: &str, layout: &str) -> Result<(), PyErr> {
    if t.ndim() != 4 {
        return Err(value_error(format!(
            "{name}: expected rank 4 {layout}, got shape {:?}",
            t.shape
        )));
    }
    if let Device::Cuda(_) = t.device {
        return Err(value_error(format!(
            "{op}: the CUDA kernels are not implemented yet; use CPU tensors ({name} is on {})",
            t.device
        )));
    }
    expect_dtype(t, name, FLOATS)?;
    expect_unit_last_stride(t, name)
}

fn expect_like(
    t: &View,
    name: &str,
    shape: &[usize],
    what: &str,
    dtype: DType,
) -> Result<(), PyErr> {
    expect_tensor(t, name, shape, what, dtype, Device::Cpu)
}

fn expect_head_dim(name: &str, d: usize) -> Result<(), PyErr> {
    if d == 0 || d > MAX_HEAD_DIM {
        return Err(value_error(format!(
            "{name}: head dim must be between 1 and {MAX_HEAD_DIM}, got {d}"
        )));
    }
    Ok(())
}

fn expect_positive(name: &str, x: usize) -> Result<(), PyErr> {
    if x < 1 {
        return Err(value_error(format!("{name}: must be at least 1, got {x}")));
    }
    Ok(())
}

/// Sequences of a (possibly packed) batch; `cmp` = (kernel_size, kernel_stride) fills the
/// compressed offsets.
fn sequences(
    b: usize,
    t: usize,
    cu: Option<&View>,
    cmp: Option<(usize, usize)>,
    batch_windows: usize,
) -> Result<Vec<NsaSeq>, PyErr> {
    match cu {
        None => Ok((0..b)
            .map(|i| NsaSeq {
                batch: i,
                start: 0,
                len: t,
                cstart: 0,
                clen: batch_windows,
            })
            .collect()),
        Some(cu) => {
            check_cu_seqlens(cu, Device::Cpu, b)?;
            let starts = read_cu_seqlens(cu, t)?;
            let mut acc = 0;
            Ok(starts
                .windows(2)
                .map(|w| {
                    let len = w[1] - w[0];
                    let clen = cmp.map_or(0, |(l, d)| num_windows(len, l, d));
                    let s = NsaSeq {
                        batch: 0,
                        start: w[0],
                        len,
                        cstart: acc,
                        clen,
                    };
                    acc += clen;
                    s
                })
                .collect())
        }
    }
}

/// The attention branch of one call: "selected", "window" or "compressed".
pub struct Branch<'a> {
    pub kind: &'a str,
    pub block_indices: Option<&'a View>,
    pub block_counts: Option<&'a View>,
    /// selected: constant block count (< 0: all); ignored otherwise
    pub count: i64,
    /// selected: block_size; window: window_size; compressed: kernel_size
    pub a: usize,
    /// compressed: kernel_stride
    pub b: usize,
}

struct AttnProblem<'a> {
    keys: KeySet<'a>,
    seqs: Vec<NsaSeq>,
    dtype: DType,
    b: usize,
    t: usize,
    hq: usize,
    d: usize,
    hkv: usize,
    dv: usize,
}

fn op_name(kind: &str) -> &'static str {
    match kind {
        "selected" => "nsa_selected_attn",
        "window" => "sliding_window_attn",
        _ => "nsa_compressed_attn",
    }
}

fn check_attn<'a>(
    br: &Branch<'a>,
    q: &View,
    k: &View,
    v: &View,
    cu: Option<&View>,
) -> Result<AttnProblem<'a>, PyErr> {
    let op = op_name(br.kind);
    let (kname, vname) = if br.kind == "compressed" {
        ("k_cmp", "v_cmp")
    } else {
        ("k", "v")
    };
    expect_tokens_tensor(q, "q", op, "[B, T, Hq, D]")?;
    expect_tokens_tensor(k, kname, op, "[B, S, Hkv, D]")?;
    expect_tokens_tensor(v, vname, op, "[B, S, Hkv, Dv]")?;
    let (b, t, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let dtype = q.dtype;
    let hkv = k.shape[2];
    if hkv == 0 || hq == 0 || hq % hkv != 0 {
        return Err(value_error(format!(
            "{kname}: the number of kv heads ({hkv}) must divide the number of query heads ({hq})"
        )));
    }
    let s = if br.kind == "compressed" { ANY } else { t };
    expect_shape(k, kname, &[b, s, hkv, d], "[B, S, Hkv, D] with q's B and D")?;
    let s = k.shape[1];
    expect_shape(v, vname, &[b, s, hkv, ANY], "[B, S, Hkv, Dv] like k")?;
    let dv = v.shape[3];
    expect_head_dim("q", d)?;
    expect_head_dim(vname, dv)?;
    for (x, name) in [(k, kname), (v, vname)] {
        expect_dtype(x, name, &[dtype])?;
    }
    let keys = match br.kind {
        "window" => {
            expect_positive("window_size", br.a)?;
            KeySet::Window(br.a)
        }
        "compressed" => {
            expect_positive("kernel_size", br.a)?;
            expect_positive("kernel_stride", br.b)?;
            KeySet::Compressed {
                size: br.a,
                stride: br.b,
            }
        }
        "selected" => {
            expect_positive("block_size", br.a)?;
            let idx = br
                .block_indices
                .ok_or_else(|| value_error("block_indices: required"))?;
            expect_shape(idx, "block_indices", &[b, t, hkv, ANY], "[B, T, Hkv, n]")?;
            expect_dtype(idx, "block_indices", INTS)?;
            expect_device(idx, "block_indices", Device::Cpu)?;
            let counts = match br.block_counts {
                Some(c) => {
                    expect_shape(c, "block_counts", &[b, t, hkv], "[B, T, Hkv]")?;
                    expect_dtype(c, "block_counts", INTS)?;
                    expect_device(c, "block_counts", Device::Cpu)?;
                    Counts::Per(c)
                }
                None if br.count >= 0 => Counts::Const(br.count as usize),
                None => Counts::All,
            };
            KeySet::Selected {
                indices: idx,
                block: br.a,
                counts,
            }
        }
        other => {
            return Err(value_error(format!(
                "kind: unknown attention branch {other:?}"
            )))
        }
    };
    let cmp = (br.kind == "compressed").then_some((br.a, br.b));
    let seqs = sequences(b, t, cu, cmp, s)?;
    if cu.is_some() && br.kind == "compressed" {
        let total: usize = seqs.iter().map(|x| x.clen).sum();
        if total != s {
            return Err(value_error(format!(
                "k_cmp: expected {total} compressed rows (the windows of the sequences in cu_seqlens), got {s}"
            )));
        }
    }
    Ok(AttnProblem {
        keys,
        seqs,
        dtype,
        b,
        t,
        hq,
        d,
        hkv,
        dv,
    })
}

#[allow(clippy::too_many_arguments)]
pub fn attn_forward(
    br: &Branch,
    q: &View,
    k: &View,
    v: &View,
    o: &View,
    lse: &View,
    scale: f64,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let p = check_attn(br, q, k, v, cu)?;
    expect_like(o, "out", &[p.b, p.t, p.hq, p.dv], "[B, T, Hq, Dv]", p.dtype)?;
    expect_unit_last_stride(o, "out")?;
    expect_like(
        lse,
        "lse",
        &[p.b, p.t, p.hq],
        "[B, T, Hq]",
        accumulator_dtype(p.dtype),
    )?;
    attn_fwd(&AttnFwd {
        q,
        k,
        v,
        o,
        lse,
        keys: p.keys,
        seqs: &p.seqs,
        scale,
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn attn_backward(
    br: &Branch,
    q: &View,
    k: &View,
    v: &View,
    o: &View,
    lse: &View,
    dout: &View,
    dq: &View,
    dk: &View,
    dv: &View,
    scale: f64,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let p = check_attn(br, q, k, v, cu)?;
    let out_shape = [p.b, p.t, p.hq, p.dv];
    expect_like(o, "out", &out_shape, "[B, T, Hq, Dv]", p.dtype)?;
    expect_like(dout, "grad_out", &out_shape, "[B, T, Hq, Dv]", p.dtype)?;
    expect_like(
        lse,
        "lse",
        &[p.b, p.t, p.hq],
        "[B, T, Hq]",
        accumulator_dtype(p.dtype),
    )?;
    expect_like(dq, "dq", &q.shape, "like q", p.dtype)?;
    expect_like(dk, "dk", &k.shape, "like k", p.dtype)?;
    expect_like(dv, "dv", &v.shape, "like v", p.dtype)?;
    let _ = (p.d, p.hkv);
    for (x, name) in [
        (o, "out"),
        (dout, "grad_out"),
        (dq, "dq"),
        (dk, "dk"),
        (dv, "dv"),
    ] {
        expect_unit_last_stride(x, name)?;
    }
    attn_bwd(&AttnBwd {
        q,
        k,
        v,
        o,
        lse,
        dout,
        dq,
        dk,
        dv,
        keys: p.keys,
        seqs: &p.seqs,
        scale,
    });
    Ok(())
}

/// Selection parameters of `nsa_topk_blocks`.
pub struct Selection {
    pub kernel_size: usize,
    pub kernel_stride: usize,
    pub block_size: usize,
    pub topk: usize,
    pub init_blocks: usize,
    pub local_blocks: usize,
}

pub fn topk(
    sel: &Selection,
    q: &View,
    k_cmp: &View,
    lse: &View,
    out: &View,
    scale: f64,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let op = "nsa_topk_blocks";
    expect_tokens_tensor(q, "q", op, "[B, T, Hq, D]")?;
    expect_tokens_tensor(k_cmp, "k_cmp", op, "[B, C, Hkv, D]")?;
    let (b, t, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    expect_head_dim("q", d)?;
    let hkv = k_cmp.shape[2];
    if hkv == 0 || hq == 0 || hq % hkv != 0 {
        return Err(value_error(format!(
            "k_cmp: the number of kv heads ({hkv}) must divide the number of query heads ({hq})"
        )));
    }
    expect_shape(
        k_cmp,
        "k_cmp",
        &[b, ANY, hkv, d],
        "[B, C, Hkv, D] with q's B and D",
    )?;
    expect_dtype(k_cmp, "k_cmp", &[q.dtype])?;
    expect_like(
        lse,
        "lse",
        &[b, t, hq],
        "[B, T, Hq]",
        accumulator_dtype(q.dtype),
    )?;
    expect_positive("kernel_size", sel.kernel_size)?;
    expect_positive("kernel_stride", sel.kernel_stride)?;
    expect_positive("block_size", sel.block_size)?;
    expect_positive("topk", sel.topk)?;
    if sel.kernel_size % sel.kernel_stride != 0 || sel.block_size % sel.kernel_stride != 0 {
        return Err(value_error(format!(
            "kernel_stride: kernel_size ({}) and block_size ({}) must be multiples of kernel_stride ({})",
            sel.kernel_size, sel.block_size, sel.kernel_stride
        )));
    }
    expect_like(
        out,
        "block_indices",
        &[b, t, hkv, sel.topk],
        "[B, T, Hkv, topk]",
        DType::I32,
    )?;
    let c = k_cmp.shape[1];
    let seqs = sequences(b, t, cu, Some((sel.kernel_size, sel.kernel_stride)), c)?;
    if cu.is_some() {
        let total: usize = seqs.iter().map(|x| x.clen).sum();
        if total != c {
            return Err(value_error(format!(
                "k_cmp: expected {total} compressed rows (the windows of the sequences in cu_seqlens), got {c}"
            )));
        }
    }
    topk_blocks(&TopK {
        q,
        k_cmp,
        lse,
        out,
        seqs: &seqs,
        size: sel.kernel_size,
        stride: sel.kernel_stride,
        block: sel.block_size,
        topk: sel.topk,
        init_blocks: sel.init_blocks,
        local_blocks: sel.local_blocks,
        scale,
    });
    Ok(())
}

struct CompressProblem {
    seqs: Vec<NsaSeq>,
    dout: usize,
}

fn check_compress(
    x: &View,
    weight: Option<&View>,
    pe: Option<&View>,
    size: usize,
    stride: usize,
    cu: Option<&View>,
) -> Result<CompressProblem, PyErr> {
    expect_tokens_tensor(x, "x", "nsa_compress", "[B, T, H, D]")?;
    expect_positive("kernel_size", size)?;
    expect_positive("kernel_stride", stride)?;
    let (b, t, h, d) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    expect_head_dim("x", d)?;
    let mut dout = d;
    if let Some(w) = weight {
        expect_shape(
            w,
            "weight",
            &[h, size * d, ANY],
            "[H, kernel_size·D, D_out]",
        )?;
        expect_dtype(w, "weight", &[x.dtype])?;
        expect_device(w, "weight", Device::Cpu)?;
        expect_unit_last_stride(w, "weight")?;
        dout = w.shape[2];
        expect_head_dim("weight", dout)?;
    }
    if let Some(pe) = pe {
        if weight.is_none() {
            return Err(value_error(
                "pe: only used with weight (linear compression)",
            ));
        }
        expect_like(pe, "pe", &[h, size, d], "[H, kernel_size, D]", x.dtype)?;
        expect_unit_last_stride(pe, "pe")?;
    }
    let seqs = sequences(b, t, cu, Some((size, stride)), num_windows(t, size, stride))?;
    Ok(CompressProblem { seqs, dout })
}

fn out_rows(seqs: &[NsaSeq], cu: Option<&View>, batch_windows: usize) -> usize {
    if cu.is_some() {
        seqs.iter().map(|s| s.clen).sum()
    } else {
        batch_windows
    }
}

#[allow(clippy::too_many_arguments)]
pub fn compress_forward(
    x: &View,
    weight: Option<&View>,
    pe: Option<&View>,
    out: &View,
    size: usize,
    stride: usize,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let p = check_compress(x, weight, pe, size, stride, cu)?;
    let c = out_rows(&p.seqs, cu, num_windows(x.shape[1], size, stride));
    let shape = [x.shape[0], c, x.shape[2], p.dout];
    expect_like(out, "out", &shape, "[B, C, H, D_out]", x.dtype)?;
    expect_unit_last_stride(out, "out")?;
    compress_fwd(&Compress {
        x,
        weight,
        pe,
        out,
        seqs: &p.seqs,
        size,
        stride,
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub fn compress_backward(
    x: &View,
    weight: Option<&View>,
    pe: Option<&View>,
    dout: &View,
    dx: &View,
    dweight: Option<&View>,
    dpe: Option<&View>,
    size: usize,
    stride: usize,
    cu: Option<&View>,
) -> Result<(), PyErr> {
    let p = check_compress(x, weight, pe, size, stride, cu)?;
    let c = out_rows(&p.seqs, cu, num_windows(x.shape[1], size, stride));
    let shape = [x.shape[0], c, x.shape[2], p.dout];
    expect_like(dout, "grad_out", &shape, "[B, C, H, D_out]", x.dtype)?;
    expect_unit_last_stride(dout, "grad_out")?;
    expect_like(dx, "dx", &x.shape, "like x", x.dtype)?;
    expect_unit_last_stride(dx, "dx")?;
    if let Some(dw) = dweight {
        let w = weight.ok_or_else(|| value_error("dweight: given without weight"))?;
        expect_like(dw, "dweight", &w.shape, "like weight", x.dtype)?;
        expect_unit_last_stride(dw, "dweight")?;
    }
    if let Some(dp) = dpe {
        let pe = pe.ok_or_else(|| value_error("dpe: given without pe"))?;
        expect_like(dp, "dpe", &pe.shape, "like pe", x.dtype)?;
        expect_unit_last_stride(dp, "dpe")?;
    }
    compress_bwd(&CompressBwd {
        x,
        weight,
        pe,
        dout,
        dx,
        dweight,
        dpe,
        seqs: &p.seqs,
        size,
        stride,
    });
    Ok(())
}
