//! Native Sparse Attention: argument checks and dispatch. CPU kernels for every op; CUDA
//! kernels (cuda/nsa.cu) for the attention branches (`attn_forward` / `attn_backward`).

use super::{
    accumulator_dtype, check_cu_seqlens, expect_device, expect_dtype, expect_shape, expect_tensor,
    expect_unit_last_stride, read_cu_seqlens, value_error,
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

/// Rank 4, float dtype, unit last stride, on CPU or CUDA (the attention branches).
fn expect_attn_tensor(t: &View, name: &str, layout: &str) -> Result<(), PyErr> {
    if t.ndim() != 4 {
        return Err(value_error(format!(
            "{name}: expected rank 4 {layout}, got shape {:?}",
            t.shape
        )));
    }
    let floats: &[DType] = match t.device {
        Device::Cpu => FLOATS,
        Device::Cuda(_) => &[DType::F32, DType::F16, DType::BF16],
    };
    expect_dtype(t, name, floats)?;
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
    /// tokens per chunk of a query list
    pub chunk_tokens: usize,
    pub stream: usize,
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
    expect_tensor(
        lse,
        "lse",
        &[p.b, p.t, p.hq],
        "[B, T, Hq]",
        accumulator_dtype(p.dtype),
        dev,
    )?;
    if let Device::Cuda(ordinal) = dev {
        return cuda_attn_forward(br, &p, ordinal, q, k, v, o, lse, scale, cu, aux)
            .map_err(value_error);
    }
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
    aux: &CudaAux,
) -> Result<(), PyErr> {
    let p = check_attn(br, q, k, v, cu)?;
    let dev = p.device;
    let out_shape = [p.b, p.t, p.hq, p.dv];
    expect_tensor(o, "out", &out_shape, "[B, T, Hq, Dv]", p.dtype, dev)?;
    expect_tensor(dout, "grad_out", &out_shape, "[B, T, Hq, Dv]", p.dtype, dev)?;
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

// ---------------------------------------------------------------------------------------------
// CUDA: the attention branches (cuda/nsa.cu). Compression and selection live elsewhere.

const SOURCE: &str = include_str!("../../cuda/nsa.cu");
/// Keys per key tile (NSA_BN in cuda/nsa.cu).
const KEY_TILE: usize = 64;

/// Kernel parameters, laid out exactly like `NsaParams` in cuda/nsa.cu.
#[repr(C)]
struct NsaParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    dout: u64,
    out: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    lse: u64,
    delta: u64,
    idx: u64,
    counts: u64,
    cu: u64,
    cmp_off: u64,
    entries: u64,
    list_off: u64,
    chunk_off: u64,
    split_off: u64,
    part_o: u64,
    part_lse: u64,
    scratch: u64,
    sq: [i64; 3],
    sk: [i64; 3],
    sv: [i64; 3],
    so: [i64; 3],
    sdo: [i64; 3],
    sdq: [i64; 3],
    sdk: [i64; 3],
    sdv: [i64; 3],
    slse: [i64; 3],
    sidx: [i64; 4],
    scnt: [i64; 3],
    b: i32,
    t: i32,
    s: i32,
    hq: i32,
    hkv: i32,
    g: i32,
    d: i32,
    dvh: i32,
    n: i32,
    nseq: i32,
    cu_kind: i32,
    idx_kind: i32,
    cnt_kind: i32,
    count_const: i32,
    a: i32,
    bb: i32,
    nl: i32,
    chunk_tokens: i32,
    key_tiles: i32,
    vec_q: i32,
    vec_k: i32,
    vec_v: i32,
    vec_o: i32,
    vec_do: i32,
    scale: f32,
}

/// Compile-time configuration of one module of cuda/nsa.cu: dtype and padded head dims.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub elem: u32,
    pub dk: usize,
    pub dv: usize,
}

/// The kernels of one module with the dynamic shared memory each needs (bytes).
fn kernel_table(v: &Variant) -> Vec<(&'static str, u32)> {
    let (es, pad) = if v.elem == 0 { (4, 4) } else { (2, 8) };
    let (ldk, ldv) = (v.dk + pad, v.dv + pad);
    let bn = KEY_TILE;
    let fwd = |m: usize| ((m * ldk + bn * ldk + bn * ldv) * es) as u32;
    let kv = |kt: usize| ((64 * ldk + kt * bn * (ldk + ldv)) * es) as u32;
    let dq = |m: usize| ((m * ldk + m * ldv + bn * ldk + bn * ldv) * es) as u32;
    let dkdv = ((64 * ldk + 64 * ldv + bn * ldk + bn * ldv) * es) as u32;
    vec![
        ("nsa_fwd_win", fwd(64)),
        ("nsa_fwd_cmp", fwd(64)),
        ("nsa_fwd_selq1", fwd(16)),
        ("nsa_fwd_selq2", fwd(32)),
        ("nsa_fwd_selq4", fwd(64)),
        ("nsa_fwd_selkv1", kv(1)),
        ("nsa_fwd_selkv2", kv(2)),
        ("nsa_combine", 0),
        ("nsa_delta", 0),
        ("nsa_dq_win", dq(64)),
        ("nsa_dq_cmp", dq(64)),
        ("nsa_dq_selq1", dq(16)),
        ("nsa_dq_selq2", dq(32)),
        ("nsa_dq_selq4", dq(64)),
        ("nsa_dkdv_win", dkdv),
        ("nsa_dkdv_cmp", dkdv),
        ("nsa_dkdv_sel", dkdv),
        ("nsa_dkdv_reduce", 0),
    ]
}

impl Variant {
    fn new(dtype: DType, d: usize, dv: usize) -> Variant {
        let elem = match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            _ => 2,
        };
        let pad = |x: usize| if x <= 64 { 64 } else { 128 };
        Variant {
            elem,
            dk: pad(d),
            dv: pad(dv),
        }
    }

    pub fn defines(&self) -> Vec<(String, String)> {
        vec![
            ("NSA_ELEM".into(), self.elem.to_string()),
            ("NSA_DK".into(), self.dk.to_string()),
            ("NSA_DV".into(), self.dv.to_string()),
        ]
    }

    /// Every variant the dispatcher can choose (compiled by CI for sm_80 and sm_90a).
    pub fn all() -> Vec<Variant> {
        let mut out = Vec::new();
        for elem in 0..3 {
            for dk in [64, 128] {
                for dv in [64, 128] {
                    out.push(Variant { elem, dk, dv });
                }
            }
        }
        out
    }
}

pub fn compile_variant(v: &Variant, arch: &str) -> Result<usize, String> {
    cuda::compile_cubin("nsa.cu", &cuda::source(SOURCE), &v.defines(), arch).map(|c| c.len())
}

fn strides3(t: Option<&View>) -> [i64; 3] {
    t.map_or([0; 3], |t| {
        [
            t.strides[0] as i64,
            t.strides[1] as i64,
            t.strides[2] as i64,
        ]
    })
}

/// Whether every row start of a [B, T, H, D] tensor is 16-byte aligned.
fn vectorizable(t: &View) -> bool {
    let elems = 16 / if t.dtype == DType::F32 { 4 } else { 2 };
    t.addr() % 16 == 0 && t.strides[..3].iter().all(|&s| s % elems as isize == 0)
}

fn int_kind(t: Option<&View>) -> i32 {
    t.map_or(-1, |t| if t.dtype == DType::I64 { 1 } else { 0 })
}

fn addr(t: Option<&View>) -> u64 {
    t.map_or(0, |t| t.addr())
}

/// Checks a scratch tensor of the CUDA plan: device, dtype, element count.
fn expect_aux(
    t: Option<&View>,
    name: &str,
    dtype: DType,
    min_len: usize,
    dev: Device,
) -> Result<(), String> {
    let t = t.ok_or_else(|| format!("{name}: required on CUDA"))?;
    if t.device != dev || t.dtype != dtype || t.numel() < min_len {
        return Err(format!(
            "{name}: expected at least {min_len} {} elements on {dev}, got {:?} {} on {}",
            dtype.name(),
            t.shape,
            t.dtype.name(),
            t.device
        ));
    }
    let contiguous = t.ndim() == 0 || *t.strides.last().unwrap() == 1;
    if !contiguous {
        return Err(format!("{name}: must be contiguous"));
    }
    Ok(())
}

struct BwdTensors<'a> {
    q: &'a View,
    k: &'a View,
    v: &'a View,
    o: &'a View,
    lse: &'a View,
    dout: &'a View,
    dq: &'a View,
    dk: &'a View,
    dv: &'a View,
}

/// Parameters shared by every kernel of one call (pointers of the forward or backward filled
/// by the caller).
#[allow(clippy::too_many_arguments)]
fn base_params(
    br: &Branch,
    p: &AttnProblem,
    q: &View,
    k: &View,
    v: &View,
    lse: &View,
    scale: f64,
    cu: Option<&View>,
    aux: &CudaAux,
) -> Result<NsaParams, String> {
    let dev = p.device;
    let nseq = cu.map_or(p.b, |c| c.shape[0] - 1);
    let (mut idx, mut counts, mut n, mut count_const) = (None, None, 0usize, -1i64);
    if let KeySet::Selected {
        indices, counts: c, ..
    } = p.keys
    {
        idx = Some(indices);
        n = indices.shape[3];
        match c {
            Counts::Per(t) => counts = Some(t),
            Counts::Const(x) => count_const = x as i64,
            Counts::All => {}
        }
    }
    if br.kind == "compressed" && cu.is_some() {
        expect_aux(aux.cmp_off, "cmp_off", DType::I64, nseq + 1, dev)?;
    }
    let s = k.shape[1];
    for (name, x) in [
        ("T", p.t),
        ("S", s),
        ("a", br.a),
        ("b", br.b),
        ("n", n),
        ("chunk_tokens", aux.chunk_tokens),
    ] {
        if x > i32::MAX as usize / 2 {
            return Err(format!("{name} = {x} is too large for the CUDA kernels"));
        }
    }
    if p.b * p.t * p.hkv.max(1) * n.max(1) >= i32::MAX as usize {
        return Err("B·T·Hkv·n must stay below 2^31 on CUDA".into());
    }
    let sidx = idx.map_or([0; 4], |t| {
        [
            t.strides[0] as i64,
            t.strides[1] as i64,
            t.strides[2] as i64,
            t.strides[3] as i64,
        ]
    });
    Ok(NsaParams {
        q: q.addr(),
        k: k.addr(),
        v: v.addr(),
        o: 0,
        dout: 0,
        out: 0,
        dq: 0,
        dk: 0,
        dv: 0,
        lse: lse.addr(),
        delta: addr(aux.delta),
        idx: addr(idx),
        counts: addr(counts),
        cu: addr(cu),
        cmp_off: addr(aux.cmp_off),
        entries: addr(aux.entries),
        list_off: addr(aux.list_off),
        chunk_off: addr(aux.chunk_off),
        split_off: addr(aux.split_off),
        part_o: addr(aux.part_o),
        part_lse: addr(aux.part_lse),
        scratch: addr(aux.scratch),
        sq: strides3(Some(q)),
        sk: strides3(Some(k)),
        sv: strides3(Some(v)),
        so: [0; 3],
        sdo: [0; 3],
        sdq: [0; 3],
        sdk: [0; 3],
        sdv: [0; 3],
        slse: strides3(Some(lse)),
        sidx,
        scnt: strides3(counts),
        b: p.b as i32,
        t: p.t as i32,
        s: s as i32,
        hq: p.hq as i32,
        hkv: p.hkv as i32,
        g: (p.hq / p.hkv) as i32,
        d: p.d as i32,
        dvh: p.dv as i32,
        n: n as i32,
        nseq: nseq as i32,
        cu_kind: int_kind(cu),
        idx_kind: int_kind(idx),
        cnt_kind: int_kind(counts),
        count_const: count_const.min(i32::MAX as i64) as i32,
        a: br.a as i32,
        bb: br.b as i32,
        nl: 0,
        chunk_tokens: aux.chunk_tokens.max(1) as i32,
        key_tiles: br.a.div_ceil(KEY_TILE) as i32,
        vec_q: vectorizable(q) as i32,
        vec_k: vectorizable(k) as i32,
        vec_v: vectorizable(v) as i32,
        vec_o: 0,
        vec_do: 0,
        scale: scale as f32,
    })
}

/// The query-outer kernel of selected attention for G heads per group: warps per CTA.
fn sel_warps(g: usize) -> usize {
    match g {
        0..=16 => 1,
        17..=32 => 2,
        _ => 4,
    }
}

/// The selected-attention list plan (KV-outer): number of lists and the chunk grid bound.
fn list_plan(p: &AttnProblem, aux: &CudaAux, n: usize, dev: Device) -> Result<(i32, u32), String> {
    let lo = aux.list_off.ok_or("list_off: required with entries")?;
    let nl = lo.numel().saturating_sub(1);
    expect_aux(aux.entries, "entries", DType::I32, 0, dev)?;
    expect_aux(Some(lo), "list_off", DType::I32, nl + 1, dev)?;
    expect_aux(aux.chunk_off, "chunk_off", DType::I32, nl + 1, dev)?;
    if aux.entries.unwrap().numel() < p.b * p.t * p.hkv * n {
        return Err("entries: expected one slot per block-index entry".into());
    }
    let ct = aux.chunk_tokens.max(1);
    let chunks = (p.b * p.t * p.hkv * n).div_ceil(ct) + nl;
    if chunks > i32::MAX as usize || nl == 0 {
        return Err(format!(
            "selected attention plan: {nl} lists, {chunks} chunks"
        ));
    }
    Ok((nl as i32, chunks as u32))
}

#[allow(clippy::too_many_arguments)]
fn cuda_attn_forward(
    br: &Branch,
    p: &AttnProblem,
    ordinal: i32,
    q: &View,
    k: &View,
    v: &View,
    o: &View,
    lse: &View,
    scale: f64,
    cu: Option<&View>,
    aux: &CudaAux,
) -> Result<(), String> {
    let mut prm = base_params(br, p, q, k, v, lse, scale, cu, aux)?;
    prm.out = o.addr();
    prm.so = strides3(Some(o));
    prm.vec_o = vectorizable(o) as i32;
    if p.b == 0 || p.t == 0 || p.hq == 0 {
        return Ok(());
    }
    let dev = cuda::device(ordinal)?;
    let variant = Variant::new(p.dtype, p.d, p.dv);
    let table = kernel_table(&variant);
    let kernels = dev.kernels("nsa.cu", SOURCE, &variant.defines(), &table)?;
    let smem = |name: &str| table.iter().find(|x| x.0 == name).map_or(0, |x| x.1);
    let g = p.hq / p.hkv;
    let stream = aux.stream;
    let rows = |m: usize| (p.t * g).div_ceil(m) as u32;
    // SAFETY (all launches): prm mirrors NsaParams; every pointer is a validated tensor of this
    // device (or null where the kernel does not read it), and the kernels bound every access.
    unsafe {
        match br.kind {
            "window" | "compressed" => {
                let name = if br.kind == "window" {
                    "nsa_fwd_win"
                } else {
                    "nsa_fwd_cmp"
                };
                let grid = (rows(64), p.hkv as u32, p.b as u32);
                dev.launch(kernels.get(name)?, grid, 128, smem(name), stream, &prm)
            }
            _ => {
                if aux.entries.is_some() {
                    let n = prm.n as usize;
                    let (nl, chunks) = list_plan(p, aux, n, p.device)?;
                    prm.nl = nl;
                    expect_aux(
                        aux.part_o,
                        "part_o",
                        DType::F32,
                        p.b * p.t * p.hq * n * p.dv,
                        p.device,
                    )?;
                    expect_aux(
                        aux.part_lse,
                        "part_lse",
                        DType::F32,
                        p.b * p.t * p.hq * n,
                        p.device,
                    )?;
                    let name = if br.a <= KEY_TILE {
                        "nsa_fwd_selkv1"
                    } else if br.a <= 2 * KEY_TILE {
                        "nsa_fwd_selkv2"
                    } else {
                        return Err(format!(
                            "nsa_selected_attn: the KV-outer CUDA kernel supports block sizes up to {}, got {}",
                            2 * KEY_TILE,
                            br.a
                        ));
                    };
                    dev.launch(
                        kernels.get(name)?,
                        (chunks, 1, 1),
                        128,
                        smem(name),
                        stream,
                        &prm,
                    )?;
                    let nrows = (p.b * p.t * p.hq).div_ceil(4) as u32;
                    dev.launch(
                        kernels.get("nsa_combine")?,
                        (nrows, 1, 1),
                        128,
                        0,
                        stream,
                        &prm,
                    )
                } else {
                    let nw = sel_warps(g);
                    let name = ["nsa_fwd_selq1", "nsa_fwd_selq2", "", "nsa_fwd_selq4"][nw - 1];
                    let hc = g.div_ceil(16 * nw);
                    let grid = ((p.t * hc) as u32, p.hkv as u32, p.b as u32);
                    dev.launch(
                        kernels.get(name)?,
                        grid,
                        32 * nw as u32,
                        smem(name),
                        stream,
                        &prm,
                    )
                }
            }
        }
    }
}

fn cuda_attn_backward(
    br: &Branch,
    p: &AttnProblem,
    ordinal: i32,
    x: &BwdTensors,
    scale: f64,
    cu: Option<&View>,
    aux: &CudaAux,
) -> Result<(), String> {
    let mut prm = base_params(br, p, x.q, x.k, x.v, x.lse, scale, cu, aux)?;
    prm.o = x.o.addr();
    prm.dout = x.dout.addr();
    prm.dq = x.dq.addr();
    prm.dk = x.dk.addr();
    prm.dv = x.dv.addr();
    prm.so = strides3(Some(x.o));
    prm.sdo = strides3(Some(x.dout));
    prm.sdq = strides3(Some(x.dq));
    prm.sdk = strides3(Some(x.dk));
    prm.sdv = strides3(Some(x.dv));
    prm.vec_o = vectorizable(x.o) as i32;
    prm.vec_do = vectorizable(x.dout) as i32;
    let dev_kind = p.device;
    expect_aux(aux.delta, "delta", DType::F32, p.b * p.t * p.hq, dev_kind)?;
    if p.b == 0 || p.hq == 0 || (p.t == 0 && x.k.shape[1] == 0) {
        return Ok(());
    }
    let dev = cuda::device(ordinal)?;
    let variant = Variant::new(p.dtype, p.d, p.dv);
    let table = kernel_table(&variant);
    let kernels = dev.kernels("nsa.cu", SOURCE, &variant.defines(), &table)?;
    let smem = |name: &str| table.iter().find(|x| x.0 == name).map_or(0, |x| x.1);
    let g = p.hq / p.hkv;
    let stream = aux.stream;
    let hkv = p.hkv as u32;
    let b = p.b as u32;
    let s = x.k.shape[1];
    // SAFETY: as in cuda_attn_forward.
    unsafe {
        if p.t > 0 {
            let nrows = (p.b * p.t * p.hq).div_ceil(4) as u32;
            dev.launch(
                kernels.get("nsa_delta")?,
                (nrows, 1, 1),
                128,
                0,
                stream,
                &prm,
            )?;
        }
        match br.kind {
            "window" | "compressed" => {
                let (dqn, dkn) = if br.kind == "window" {
                    ("nsa_dq_win", "nsa_dkdv_win")
                } else {
                    ("nsa_dq_cmp", "nsa_dkdv_cmp")
                };
                if p.t > 0 {
                    let grid = ((p.t * g).div_ceil(64) as u32, hkv, b);
                    dev.launch(kernels.get(dqn)?, grid, 128, smem(dqn), stream, &prm)?;
                }
                if s > 0 {
                    let grid = (s.div_ceil(KEY_TILE) as u32, hkv, b);
                    dev.launch(kernels.get(dkn)?, grid, 128, smem(dkn), stream, &prm)?;
                }
                Ok(())
            }
            _ => {
                if p.t == 0 {
                    return Ok(());
                }
                let nw = sel_warps(g);
                let dqn = ["nsa_dq_selq1", "nsa_dq_selq2", "", "nsa_dq_selq4"][nw - 1];
                let hc = g.div_ceil(16 * nw);
                let grid = ((p.t * hc) as u32, hkv, b);
                dev.launch(
                    kernels.get(dqn)?,
                    grid,
                    32 * nw as u32,
                    smem(dqn),
                    stream,
                    &prm,
                )?;
                // dk/dv: KV-outer over the query lists (dk, dv zeroed by the caller)
                let n = prm.n as usize;
                let (nl, chunks) = list_plan(p, aux, n, dev_kind)?;
                prm.nl = nl;
                expect_aux(
                    aux.split_off,
                    "split_off",
                    DType::I32,
                    nl as usize + 1,
                    dev_kind,
                )?;
                expect_aux(aux.scratch, "scratch", DType::F32, 0, dev_kind)?;
                let kt = prm.key_tiles as u32;
                let name = "nsa_dkdv_sel";
                dev.launch(
                    kernels.get(name)?,
                    (chunks, kt, 1),
                    128,
                    smem(name),
                    stream,
                    &prm,
                )?;
                dev.launch(
                    kernels.get("nsa_dkdv_reduce")?,
                    (nl as u32, kt, 1),
                    128,
                    0,
                    stream,
                    &prm,
                )
            }
        }
    }
}
