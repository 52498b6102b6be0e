//! Native Sparse Attention: argument checks and dispatch. CPU kernels for every op; CUDA kernels
//! for the attention branches (`attn_cuda`: cuda/nsa.cu), the block selection (`select`:
//! cuda/nsa_select.cu) and the compression (`compress`, also cuda/nsa_select.cu).

mod attn_cuda;
mod compress;
mod select;

pub use attn_cuda::{compile_sm90_variant, compile_variant, Variant, SOURCE};
use attn_cuda::{cuda_attn_backward, cuda_attn_forward};
pub use compress::{compress_backward, compress_forward};
pub use select::{compile_sel_variant, topk, SelVariant, Selection};

use super::{
    accumulator_dtype, check_cu_seqlens, expect_device, expect_dtype, expect_out_lo, expect_rank,
    expect_shape, expect_tensor, expect_unit_last_stride, float_dtypes, read_cu_seqlens,
    value_error,
};
use crate::cpu::nsa::{
    attn_bwd, attn_fwd, compress_bwd, compress_fwd, num_windows, topk_blocks, AttnBwd, AttnFwd,
    Compress, CompressBwd, Counts, KeySet, NsaSeq, TopK,
};
use crate::cuda;
use crate::tensor::{DType, Device, View};
use pyo3::PyErr;

pub const MAX_HEAD_DIM: usize = 256;
/// Largest q·k and value head dims of the CUDA attention kernels.
pub const CUDA_MAX_HEAD_DIM: usize = 128;
const ANY: usize = usize::MAX;
const INTS: &[DType] = &[DType::I32, DType::I64];

/// Rank 4, a float dtype of its device (float64 on the CPU only), unit last stride.
fn expect_attn_tensor(t: &View, name: &str, layout: &str) -> Result<(), PyErr> {
    expect_rank(t, name, 4, layout)?;
    expect_dtype(t, name, float_dtypes(t.device))?;
    expect_unit_last_stride(t, name)
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
    device: Device,
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
    let (kname, vname) = if br.kind == "compressed" {
        ("k_cmp", "v_cmp")
    } else {
        ("k", "v")
    };
    expect_attn_tensor(q, "q", "[B, T, Hq, D]")?;
    expect_attn_tensor(k, kname, "[B, S, Hkv, D]")?;
    expect_attn_tensor(v, vname, "[B, S, Hkv, Dv]")?;
    let (b, t, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let dtype = q.dtype;
    let device = q.device;
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
        expect_device(x, name, device)?;
    }
    if let Device::Cuda(_) = device {
        if d > CUDA_MAX_HEAD_DIM || dv > CUDA_MAX_HEAD_DIM {
            return Err(value_error(format!(
                "{}: the CUDA kernels support head dims up to {CUDA_MAX_HEAD_DIM}, got D = {d}, Dv = {dv}",
                op_name(br.kind)
            )));
        }
        if b > 65535 || hkv > 65535 {
            return Err(value_error(format!(
                "q: at most 65535 batch rows and kv heads are supported on CUDA, got {b} and {hkv}"
            )));
        }
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
            expect_device(idx, "block_indices", device)?;
            let counts = match br.block_counts {
                Some(c) => {
                    expect_shape(c, "block_counts", &[b, t, hkv], "[B, T, Hkv]")?;
                    expect_dtype(c, "block_counts", INTS)?;
                    expect_device(c, "block_counts", device)?;
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
    if let Device::Cuda(_) = device {
        // cu_seqlens stay on the device: the kernels read (and clamp) them there
        if let Some(cu) = cu {
            check_cu_seqlens(cu, device, b)?;
        }
        return Ok(AttnProblem {
            keys,
            device,
            seqs: Vec::new(),
            dtype,
            b,
            t,
            hq,
            d,
            hkv,
            dv,
        });
    }
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
        device,
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

/// Scratch tensors and launch plan of the CUDA attention kernels (allocated by Python; all
/// None on the CPU). `entries`, `list_off`, `chunk_off` (and `split_off`, `scratch` in the
/// backward): the per-block query lists of selected attention, sorted on the device.
#[derive(Default, Clone, Copy)]
pub struct CudaAux<'a> {
    /// [N + 1] int64 compressed row offsets (varlen compressed attention)
    pub cmp_off: Option<&'a View>,
    pub entries: Option<&'a View>,
    pub list_off: Option<&'a View>,
    pub chunk_off: Option<&'a View>,
    pub split_off: Option<&'a View>,
    /// forward KV-outer partials: o [B, T, Hq, n, Dv], lse [B, T, Hq, n] float32
    pub part_o: Option<&'a View>,
    pub part_lse: Option<&'a View>,
    /// backward: Δ [B, T, Hq] float32 and the split-list dk/dv partials
    pub delta: Option<&'a View>,
    pub scratch: Option<&'a View>,
    /// backward KV-outer dQ partials [B, T, Hq, n, key tiles, D] float32 (small groups)
    pub part_dq: Option<&'a View>,
    /// Hopper window backward: the row table [B·Hq, 3, T rounded up to 64] float32
    pub rowinfo: Option<&'a View>,
    /// tokens per chunk of a query list
    pub chunk_tokens: usize,
    pub stream: usize,
}

/// `o_lo`: when given, also written with the rounding residual of every output element.
#[allow(clippy::too_many_arguments)]
pub fn attn_forward(
    br: &Branch,
    q: &View,
    k: &View,
    v: &View,
    o: &View,
    o_lo: Option<&View>,
    lse: &View,
    scale: f64,
    cu: Option<&View>,
    aux: &CudaAux,
) -> Result<(), PyErr> {
    let p = check_attn(br, q, k, v, cu)?;
    let dev = p.device;
    expect_tensor(
        o,
        "out",
        &[p.b, p.t, p.hq, p.dv],
        "[B, T, Hq, Dv]",
        p.dtype,
        dev,
    )?;
    expect_unit_last_stride(o, "out")?;
    expect_out_lo(o_lo, o)?;
    expect_tensor(
        lse,
        "lse",
        &[p.b, p.t, p.hq],
        "[B, T, Hq]",
        accumulator_dtype(p.dtype),
        dev,
    )?;
    if let Device::Cuda(ordinal) = dev {
        return cuda_attn_forward(br, &p, ordinal, q, k, v, o, o_lo, lse, scale, cu, aux)
            .map_err(value_error);
    }
    attn_fwd(&AttnFwd {
        q,
        k,
        v,
        o,
        o_lo,
        lse,
        keys: p.keys,
        seqs: &p.seqs,
        scale,
    });
    Ok(())
}

/// `o_lo`: the forward's output rounding residual, added to o in Δ = rowsum(dO ∘ O).
#[allow(clippy::too_many_arguments)]
pub fn attn_backward(
    br: &Branch,
    q: &View,
    k: &View,
    v: &View,
    o: &View,
    o_lo: Option<&View>,
    lse: &View,
    dout: &View,
    dq: &View,
    dk: &View,
    dv: &View,
    scale: f64,
    cu: Option<&View>,
    aux: &CudaAux,
) -> Result<(), PyErr> {
    let p = check_attn(br, q, k, v, cu)?;
    let dev = p.device;
    let out_shape = [p.b, p.t, p.hq, p.dv];
    expect_tensor(o, "out", &out_shape, "[B, T, Hq, Dv]", p.dtype, dev)?;
    expect_tensor(dout, "grad_out", &out_shape, "[B, T, Hq, Dv]", p.dtype, dev)?;
    expect_out_lo(o_lo, o)?;
    expect_tensor(
        lse,
        "lse",
        &[p.b, p.t, p.hq],
        "[B, T, Hq]",
        accumulator_dtype(p.dtype),
        dev,
    )?;
    expect_tensor(dq, "dq", &q.shape, "like q", p.dtype, dev)?;
    expect_tensor(dk, "dk", &k.shape, "like k", p.dtype, dev)?;
    expect_tensor(dv, "dv", &v.shape, "like v", p.dtype, dev)?;
    for (x, name) in [
        (o, "out"),
        (dout, "grad_out"),
        (dq, "dq"),
        (dk, "dk"),
        (dv, "dv"),
    ] {
        expect_unit_last_stride(x, name)?;
    }
    if let Device::Cuda(ordinal) = dev {
        let t = BwdTensors {
            q,
            k,
            v,
            o,
            o_lo,
            lse,
            dout,
            dq,
            dk,
            dv,
        };
        return cuda_attn_backward(br, &p, ordinal, &t, scale, cu, aux).map_err(value_error);
    }
    attn_bwd(&AttnBwd {
        q,
        k,
        v,
        o,
        o_lo,
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

/// The nsa_select.cu module: block selection and compression kernels.
const SEL_SOURCE: &str = include_str!("../../../cuda/nsa_select.cu");
/// Threads of the compression kernels (CMP_THREADS).
const CMP_THREADS: u32 = 128;

fn cuda_err(e: String) -> PyErr {
    value_error(e)
}

/// Rank 4, a float dtype the device supports, unit last stride.
fn expect_sel_tokens(t: &View, name: &str, layout: &str, dev: Device) -> Result<(), PyErr> {
    expect_attn_tensor(t, name, layout)?;
    expect_device(t, name, dev)
}

/// The tensors of one backward call of an attention branch.
struct BwdTensors<'a> {
    q: &'a View,
    k: &'a View,
    v: &'a View,
    o: &'a View,
    o_lo: Option<&'a View>,
    lse: &'a View,
    dout: &'a View,
    dq: &'a View,
    dk: &'a View,
    dv: &'a View,
}
