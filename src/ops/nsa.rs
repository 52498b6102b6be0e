//! Native Sparse Attention: argument checks and dispatch. CPU kernels for every op; CUDA
//! kernels (cuda/nsa.cu) for the attention branches (`attn_forward` / `attn_backward`).

use super::{
    accumulator_dtype, check_cu_seqlens, expect_device, expect_dtype, expect_out_lo, expect_shape,
    expect_tensor, expect_unit_last_stride, read_cu_seqlens, value_error,
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

/// Rank 4, a float dtype of its device (float64 on the CPU only), unit last stride.
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

/// Selection parameters of `nsa_topk_blocks`.
pub struct Selection {
    pub kernel_size: usize,
    pub kernel_stride: usize,
    pub block_size: usize,
    pub topk: usize,
    pub init_blocks: usize,
    pub local_blocks: usize,
}

#[allow(clippy::too_many_arguments)]
pub fn topk(
    sel: &Selection,
    q: &View,
    k_cmp: &View,
    lse: &View,
    out: &View,
    scale: f64,
    cu: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let op = "nsa_topk_blocks";
    let dev = q.device;
    expect_sel_tokens(q, "q", "[B, T, Hq, D]", dev)?;
    expect_sel_tokens(k_cmp, "k_cmp", "[B, C, Hkv, D]", dev)?;
    let _ = op;
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
    expect_tensor(
        lse,
        "lse",
        &[b, t, hq],
        "[B, T, Hq]",
        accumulator_dtype(q.dtype),
        dev,
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
    expect_tensor(
        out,
        "block_indices",
        &[b, t, hkv, sel.topk],
        "[B, T, Hkv, topk]",
        DType::I32,
        dev,
    )?;
    let c = k_cmp.shape[1];
    if let Device::Cuda(ordinal) = dev {
        if let Some(cu) = cu {
            check_cu_seqlens(cu, dev, b)?;
        }
        return topk_cuda(sel, q, k_cmp, lse, out, scale, cu, ordinal, stream);
    }
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

// ---------------------------------------------------------------------------------------------
// CUDA: selection stage (compression and block selection), cuda/nsa_select.cu

/// Rank 4, a float dtype the device supports, unit last stride.
fn expect_sel_tokens(t: &View, name: &str, layout: &str, dev: Device) -> Result<(), PyErr> {
    expect_attn_tensor(t, name, layout)?;
    expect_device(t, name, dev)
}

const SEL_SOURCE: &str = include_str!("../../cuda/nsa_select.cu");
/// Key tile of the selection kernel (NS_BN in cuda/nsa_select.cu).
const SEL_BN: usize = 64;
/// Threads of the compression kernels (CMP_THREADS).
const CMP_THREADS: u32 = 128;

/// Compile-time configuration of cuda/nsa_select.cu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SelVariant {
    /// 0 f32 (3xTF32), 1 f16, 2 bf16
    pub elem: u32,
    /// padded head dim of the selection kernel
    pub dp: usize,
    /// warps of the selection kernel (rows = 16 per warp)
    pub nw: usize,
}

impl SelVariant {
    fn elem_of(dtype: DType) -> u32 {
        match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            _ => 2,
        }
    }

    fn padded(d: usize) -> usize {
        match d {
            0..=32 => 32,
            33..=64 => 64,
            65..=96 => 96,
            97..=128 => 128,
            129..=192 => 192,
            _ => 256,
        }
    }

    /// The compression kernels do not depend on dp/nw: one module per dtype.
    fn compress(dtype: DType) -> SelVariant {
        SelVariant {
            elem: Self::elem_of(dtype),
            dp: 64,
            nw: 4,
        }
    }

    pub fn defines(&self) -> Vec<(String, String)> {
        vec![
            ("NS_ELEM".into(), self.elem.to_string()),
            ("NS_DP".into(), self.dp.to_string()),
            ("NS_NW".into(), self.nw.to_string()),
        ]
    }

    /// Every variant the dispatcher can choose (compiled by CI for sm_80 and sm_90a).
    pub fn all() -> Vec<SelVariant> {
        let mut out = Vec::new();
        for elem in 0..3 {
            for dp in [32, 64, 96, 128, 192, 256] {
                for nw in [4, 8] {
                    out.push(SelVariant { elem, dp, nw });
                }
            }
        }
        out
    }
}

pub fn compile_sel_variant(v: &SelVariant, arch: &str) -> Result<usize, String> {
    cuda::cached_cubin(
        "nsa_select.cu",
        &cuda::source(SEL_SOURCE),
        &v.defines(),
        arch,
    )
    .map(|c| c.len())
}

/// Dynamic shared memory of nsa_topk (mirrors `TopkSmem` in cuda/nsa_select.cu).
fn topk_smem_bytes(
    v: &SelVariant,
    stages: usize,
    bt: usize,
    nb: usize,
    n: usize,
    gmode: usize,
) -> usize {
    let (size, pad) = if v.elem == 0 { (4, 4) } else { (2, 8) };
    let bm = 16 * v.nw;
    let ld = v.dp + pad;
    let ldp = SEL_BN + 4;
    let floats = bm + bt * ldp + if gmode == 0 { bm * ldp } else { 0 } + bt * nb + bt * n;
    let ints = bt * n + 3 * bt;
    (bm * ld + stages * SEL_BN * ld) * size + 4 * (floats + ints)
}

/// Shared memory a CTA may use, by architecture.
fn smem_limit(arch: &str) -> usize {
    if arch.starts_with("sm_90") || arch.starts_with("sm_100") {
        227 * 1024
    } else if arch == "sm_80" || arch == "sm_87" {
        163 * 1024
    } else {
        99 * 1024
    }
}

/// Parameters of nsa_topk, laid out exactly like `TopkParams` in cuda/nsa_select.cu.
#[repr(C)]
struct TopkParams {
    q: u64,
    k: u64,
    cu: u64,
    lse: u64,
    out: u64,
    sq: [i64; 3],
    sk: [i64; 3],
    sl: [i64; 3],
    so: [i64; 4],
    t: i32,
    c: i32,
    hq: i32,
    hkv: i32,
    g: i32,
    d: i32,
    l: i32,
    s: i32,
    bk: i32,
    a: i32,
    bb: i32,
    topk: i32,
    init_blocks: i32,
    local_blocks: i32,
    n_seq: i32,
    cu_kind: i32,
    bt: i32,
    nb: i32,
    gmode: i32,
    stages: i32,
    vec_q: i32,
    vec_k: i32,
    scale_log2: f32,
}

fn cuda_err(e: String) -> PyErr {
    value_error(e)
}

#[allow(clippy::too_many_arguments)]
fn topk_cuda(
    sel: &Selection,
    q: &View,
    k_cmp: &View,
    lse: &View,
    out: &View,
    scale: f64,
    cu: Option<&View>,
    ordinal: i32,
    stream: usize,
) -> Result<(), PyErr> {
    let (b, t, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (c, hkv) = (k_cmp.shape[1], k_cmp.shape[2]);
    let g = hq / hkv;
    let (a, bb) = (
        sel.kernel_size / sel.kernel_stride,
        sel.block_size / sel.kernel_stride,
    );
    if bb + a - 1 > SEL_BN {
        return Err(value_error(format!(
            "nsa_topk_blocks: on CUDA, block_size/kernel_stride + kernel_size/kernel_stride − 1 must be at most {SEL_BN} (got {})",
            bb + a - 1
        )));
    }
    let nb = (SEL_BN - (a - 1)) / bb;
    let too_big = |name: &str, v: usize| {
        value_error(format!(
            "nsa_topk_blocks: {name} = {v} is too large for the CUDA kernel"
        ))
    };
    if t > i32::MAX as usize / 2 || c > i32::MAX as usize / 2 {
        return Err(too_big("T", t.max(c)));
    }
    if hkv > 65535 || b > 65535 {
        return Err(too_big("B or Hkv", b.max(hkv)));
    }
    if t == 0 || b == 0 || hkv == 0 {
        return Ok(());
    }
    let dev = cuda::device(ordinal).map_err(cuda_err)?;
    let limit = smem_limit(&dev.arch) - 1024; // room for the static shared memory
    let elem = SelVariant::elem_of(q.dtype);
    let dp = SelVariant::padded(d);
    let gmode = if matches!(g, 1 | 2 | 4 | 8 | 16) {
        g
    } else {
        0
    };
    // 8 warps (128 rows) for 16-bit inputs, 4 for float32; fewer warps and one key buffer when
    // the shared memory would not fit.
    let mut choice = None;
    let nws: &[usize] = if elem == 0 { &[4] } else { &[8, 4] };
    'outer: for &nw in nws {
        if g > 16 * nw {
            continue;
        }
        let v = SelVariant { elem, dp, nw };
        let bt = 16 * nw / g;
        for stages in [2, 1] {
            let bytes = topk_smem_bytes(&v, stages, bt, nb, sel.topk, gmode);
            if bytes <= limit {
                choice = Some((v, stages, bt, bytes));
                break 'outer;
            }
        }
    }
    let Some((v, stages, bt, bytes)) = choice else {
        return Err(value_error(format!(
            "nsa_topk_blocks: on CUDA, G = {g} query heads per kv head with topk = {} and head dim {d} do not fit the kernel (G ≤ 128 and a smaller topk are supported)",
            sel.topk
        )));
    };
    // The module is cached per variant and its shared-memory cap is set once: set it to what
    // any call may need (G, topk and stages change the size), not to this call's size.
    let kernels = dev
        .kernels(
            "nsa_select.cu",
            SEL_SOURCE,
            &v.defines(),
            &[("nsa_topk", limit as u32)],
        )
        .map_err(cuda_err)?;
    let params = TopkParams {
        q: q.addr(),
        k: k_cmp.addr(),
        cu: cu.map_or(0, |x| x.addr()),
        lse: lse.addr(),
        out: out.addr(),
        sq: cuda::strides(q),
        sk: cuda::strides(k_cmp),
        sl: cuda::strides(lse),
        so: cuda::strides(out),
        t: t as i32,
        c: c as i32,
        hq: hq as i32,
        hkv: hkv as i32,
        g: g as i32,
        d: d as i32,
        l: sel.kernel_size as i32,
        s: sel.kernel_stride as i32,
        bk: sel.block_size as i32,
        a: a as i32,
        bb: bb as i32,
        topk: sel.topk as i32,
        init_blocks: sel.init_blocks.min(i32::MAX as usize) as i32,
        local_blocks: sel.local_blocks.min(i32::MAX as usize / 2) as i32,
        n_seq: cu.map_or(b, |x| x.shape[0] - 1) as i32,
        cu_kind: cuda::int_kind(cu),
        bt: bt as i32,
        nb: nb as i32,
        gmode: gmode as i32,
        stages: stages as i32,
        vec_q: cuda::rows_aligned(q) as i32,
        vec_k: cuda::rows_aligned(k_cmp) as i32,
        scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
    };
    let grid = (t.div_ceil(bt) as u32, hkv as u32, b as u32);
    let f = kernels.get("nsa_topk").map_err(cuda_err)?;
    // SAFETY: params mirrors TopkParams; every pointer comes from a validated tensor on this
    // device and the kernel guards every index by the shapes passed along.
    unsafe { dev.launch(f, grid, 32 * v.nw as u32, bytes as u32, stream, &params) }
        .map_err(cuda_err)
}

/// Tensors of one compression call on CUDA.
struct CmpArgs<'a> {
    x: &'a View,
    weight: Option<&'a View>,
    pe: Option<&'a View>,
    /// forward: out; backward: grad_out ([B, R, H, D_out])
    out_or_dout: &'a View,
    cu: Option<&'a View>,
    cu_cmp: Option<&'a View>,
    size: usize,
    stride: usize,
}

/// With cu_seqlens on CUDA, the compressed offsets [N + 1] (same dtype) are required.
fn expect_cu_cmp<'a>(
    cu: Option<&View>,
    cu_cmp: Option<&'a View>,
    x: &View,
) -> Result<Option<&'a View>, PyErr> {
    match (cu, cu_cmp) {
        (None, _) => Ok(None),
        (Some(cu), Some(cc)) => {
            expect_tensor(
                cc,
                "cu_seqlens_cmp",
                &cu.shape,
                "[N + 1] like cu_seqlens",
                cu.dtype,
                x.device,
            )?;
            Ok(Some(cc))
        }
        (Some(_), None) => Err(value_error(
            "cu_seqlens_cmp: required with cu_seqlens on CUDA (the compressed offsets)",
        )),
    }
}

/// Parameters of the compression kernels, laid out exactly like `CmpParams`.
#[repr(C)]
struct CmpParams {
    x: u64,
    w: u64,
    pe: u64,
    dout: u64,
    out: u64,
    dx: u64,
    dw: u64,
    dpe: u64,
    gbuf: u64,
    cu: u64,
    cu_cmp: u64,
    sx: [i64; 3],
    so: [i64; 3],
    sdx: [i64; 3],
    sw: [i64; 2],
    sdw: [i64; 2],
    sp: [i64; 2],
    sdp: [i64; 2],
    b: i32,
    t: i32,
    h: i32,
    d: i32,
    dout_dim: i32,
    l: i32,
    s: i32,
    r: i32,
    n_seq: i32,
    cu_kind: i32,
    has_pe: i32,
}

fn cmp_params(a: &CmpArgs) -> Result<CmpParams, PyErr> {
    let x = a.x;
    let (b, t, h, d) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let r = a.out_or_dout.shape[1];
    let dout_dim = a.out_or_dout.shape[3];
    if t > i32::MAX as usize / 2 || r > i32::MAX as usize / 2 || b * h > 65535 {
        return Err(value_error(
            "nsa_compress: T, the compressed rows and B·H are too large for the CUDA kernels",
        ));
    }
    Ok(CmpParams {
        x: x.addr(),
        w: a.weight.map_or(0, |w| w.addr()),
        pe: a.pe.map_or(0, |w| w.addr()),
        dout: a.out_or_dout.addr(),
        out: a.out_or_dout.addr(),
        dx: 0,
        dw: 0,
        dpe: 0,
        gbuf: 0,
        cu: a.cu.map_or(0, |c| c.addr()),
        cu_cmp: a.cu_cmp.map_or(0, |c| c.addr()),
        sx: cuda::strides(x),
        so: cuda::strides(a.out_or_dout),
        sdx: [0; 3],
        sw: cuda::opt_strides(a.weight),
        sdw: [0; 2],
        sp: cuda::opt_strides(a.pe),
        sdp: [0; 2],
        b: b as i32,
        t: t as i32,
        h: h as i32,
        d: d as i32,
        dout_dim: dout_dim as i32,
        l: a.size as i32,
        s: a.stride as i32,
        r: r as i32,
        n_seq: a.cu.map_or(b, |c| c.shape[0] - 1) as i32,
        cu_kind: cuda::int_kind(a.cu),
        has_pe: a.pe.is_some() as i32,
    })
}

const CMP_KERNELS: &[(&str, u32)] = &[
    ("nsa_cmp_mean_fwd", 0),
    ("nsa_cmp_linear_fwd", 0),
    ("nsa_cmp_linear_dg", 0),
    ("nsa_cmp_dx_mean", 0),
    ("nsa_cmp_dx_linear", 0),
    ("nsa_cmp_linear_dw", 0),
    ("nsa_cmp_linear_dpe", 0),
];

fn compress_forward_cuda(a: &CmpArgs, ordinal: i32, stream: usize) -> Result<(), PyErr> {
    let p = cmp_params(a)?;
    let (b, h, r) = (p.b as u32, p.h as u32, p.r as u32);
    if b == 0 || r == 0 || h == 0 || p.dout_dim == 0 {
        return Ok(());
    }
    let dev = cuda::device(ordinal).map_err(cuda_err)?;
    let v = SelVariant::compress(a.x.dtype);
    let k = dev
        .kernels("nsa_select.cu", SEL_SOURCE, &v.defines(), CMP_KERNELS)
        .map_err(cuda_err)?;
    // SAFETY: p mirrors CmpParams; pointers come from validated tensors on this device.
    unsafe {
        if a.weight.is_none() {
            let f = k.get("nsa_cmp_mean_fwd").map_err(cuda_err)?;
            dev.launch(f, (r.div_ceil(8), h, b), CMP_THREADS, 0, stream, &p)
        } else {
            let f = k.get("nsa_cmp_linear_fwd").map_err(cuda_err)?;
            let grid = (r.div_ceil(64), (p.dout_dim as u32).div_ceil(64), b * h);
            dev.launch(f, grid, CMP_THREADS, 0, stream, &p)
        }
    }
    .map_err(cuda_err)
}

#[allow(clippy::too_many_arguments)]
fn compress_backward_cuda(
    a: &CmpArgs,
    dx: &View,
    dweight: Option<&View>,
    dpe: Option<&View>,
    scratch: Option<&View>,
    ordinal: i32,
    stream: usize,
) -> Result<(), PyErr> {
    let mut p = cmp_params(a)?;
    p.dx = dx.addr();
    p.sdx = cuda::strides(dx);
    p.dw = dweight.map_or(0, |w| w.addr());
    p.sdw = cuda::opt_strides(dweight);
    p.dpe = dpe.map_or(0, |w| w.addr());
    p.sdp = cuda::opt_strides(dpe);
    let (b, t, h, r) = (p.b as u32, p.t as u32, p.h as u32, p.r as u32);
    let kdim = (p.l * p.d) as u32;
    if h == 0 {
        return Ok(());
    }
    if a.weight.is_some() {
        let want = [b as usize, r as usize, h as usize, kdim as usize];
        let s = scratch.ok_or_else(|| {
            value_error("scratch: a float32 [B, C, H, kernel_size·D] buffer is required")
        })?;
        expect_tensor(
            s,
            "scratch",
            &want,
            "[B, C, H, kernel_size·D]",
            DType::F32,
            a.x.device,
        )?;
        if s.numel() > 0
            && s.strides
                != [
                    (r * h * kdim) as isize,
                    (h * kdim) as isize,
                    kdim as isize,
                    1,
                ]
        {
            return Err(value_error("scratch: must be contiguous"));
        }
        p.gbuf = s.addr();
    }
    let dev = cuda::device(ordinal).map_err(cuda_err)?;
    let v = SelVariant::compress(a.x.dtype);
    let k = dev
        .kernels("nsa_select.cu", SEL_SOURCE, &v.defines(), CMP_KERNELS)
        .map_err(cuda_err)?;
    let launch = |name: &str, grid: (u32, u32, u32)| -> Result<(), PyErr> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(());
        }
        let f = k.get(name).map_err(cuda_err)?;
        // SAFETY: p mirrors CmpParams; pointers come from validated tensors on this device.
        unsafe { dev.launch(f, grid, CMP_THREADS, 0, stream, &p) }.map_err(cuda_err)
    };
    if a.weight.is_none() {
        return launch("nsa_cmp_dx_mean", (t.div_ceil(8), h, b));
    }
    launch(
        "nsa_cmp_linear_dg",
        (r.div_ceil(64), kdim.div_ceil(64), b * h),
    )?;
    launch("nsa_cmp_dx_linear", (t.div_ceil(8), h, b))?;
    if dweight.is_some() {
        launch(
            "nsa_cmp_linear_dw",
            (kdim.div_ceil(64), (p.dout_dim as u32).div_ceil(64), h),
        )?;
    }
    if dpe.is_some() {
        launch("nsa_cmp_linear_dpe", (kdim.div_ceil(CMP_THREADS), h, 1))?;
    }
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
    let dev = x.device;
    expect_sel_tokens(x, "x", "[B, T, H, D]", dev)?;
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
        expect_device(w, "weight", dev)?;
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
        expect_tensor(pe, "pe", &[h, size, d], "[H, kernel_size, D]", x.dtype, dev)?;
        expect_unit_last_stride(pe, "pe")?;
    }
    let seqs = if dev == Device::Cpu {
        sequences(b, t, cu, Some((size, stride)), num_windows(t, size, stride))?
    } else {
        if let Some(cu) = cu {
            check_cu_seqlens(cu, dev, b)?;
        }
        Vec::new() // CUDA: the kernels read cu_seqlens and cu_seqlens_cmp on the device
    };
    Ok(CompressProblem { seqs, dout })
}

fn out_rows(seqs: &[NsaSeq], cu: Option<&View>, batch_windows: usize) -> usize {
    if cu.is_some() {
        seqs.iter().map(|s| s.clen).sum()
    } else {
        batch_windows
    }
}

/// Compressed rows of the output: on CUDA with cu_seqlens the count comes from the output
/// tensor (the wrapper sized it from cu_seqlens_cmp), which the kernels never read past.
fn compress_rows(
    p: &CompressProblem,
    x: &View,
    out: &View,
    size: usize,
    stride: usize,
    cu: Option<&View>,
) -> usize {
    if x.device != Device::Cpu && cu.is_some() {
        out.shape.get(1).copied().unwrap_or(0)
    } else {
        out_rows(&p.seqs, cu, num_windows(x.shape[1], size, stride))
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
    cu_cmp: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check_compress(x, weight, pe, size, stride, cu)?;
    let c = compress_rows(&p, x, out, size, stride, cu);
    let shape = [x.shape[0], c, x.shape[2], p.dout];
    expect_tensor(out, "out", &shape, "[B, C, H, D_out]", x.dtype, x.device)?;
    expect_unit_last_stride(out, "out")?;
    if let Device::Cuda(ordinal) = x.device {
        let cmp = CmpArgs {
            x,
            weight,
            pe,
            out_or_dout: out,
            cu,
            cu_cmp: expect_cu_cmp(cu, cu_cmp, x)?,
            size,
            stride,
        };
        return compress_forward_cuda(&cmp, ordinal, stream);
    }
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
    cu_cmp: Option<&View>,
    scratch: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check_compress(x, weight, pe, size, stride, cu)?;
    let dev = x.device;
    let c = compress_rows(&p, x, dout, size, stride, cu);
    let shape = [x.shape[0], c, x.shape[2], p.dout];
    expect_tensor(dout, "grad_out", &shape, "[B, C, H, D_out]", x.dtype, dev)?;
    expect_unit_last_stride(dout, "grad_out")?;
    expect_tensor(dx, "dx", &x.shape, "like x", x.dtype, dev)?;
    expect_unit_last_stride(dx, "dx")?;
    if let Some(dw) = dweight {
        let w = weight.ok_or_else(|| value_error("dweight: given without weight"))?;
        expect_tensor(dw, "dweight", &w.shape, "like weight", x.dtype, dev)?;
        expect_unit_last_stride(dw, "dweight")?;
    }
    if let Some(dp) = dpe {
        let pe = pe.ok_or_else(|| value_error("dpe: given without pe"))?;
        expect_tensor(dp, "dpe", &pe.shape, "like pe", x.dtype, dev)?;
        expect_unit_last_stride(dp, "dpe")?;
    }
    if let Device::Cuda(ordinal) = dev {
        let cmp = CmpArgs {
            x,
            weight,
            pe,
            out_or_dout: dout,
            cu,
            cu_cmp: expect_cu_cmp(cu, cu_cmp, x)?,
            size,
            stride,
        };
        return compress_backward_cuda(&cmp, dx, dweight, dpe, scratch, ordinal, stream);
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

pub const SOURCE: &str = include_str!("../../cuda/nsa.cu");
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
    part_dq: u64,
    out_lo: u64,
    rowinfo: u64,
    sq: [i64; 3],
    sk: [i64; 3],
    sv: [i64; 3],
    so: [i64; 3],
    sdo: [i64; 3],
    sdq: [i64; 3],
    sdk: [i64; 3],
    sdv: [i64; 3],
    slo: [i64; 3],
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
    tp: i32,
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
    // selected query-outer (mirrors NsaSel): 16 query rows (+ 16 dO rows) and two K/V tile
    // buffers, one where two would exceed 96 KB
    let stage = bn * (ldk + ldv) * es;
    let sel_kv = if 2 * stage <= 96 * 1024 {
        2 * stage
    } else {
        stage
    };
    let fwd_selq = (16 * ldk * es + sel_kv) as u32;
    let dq_selq = (16 * (ldk + ldv) * es + sel_kv) as u32;
    // plus the dSᵀ tile (64 keys x 72) that the KV-outer dQ reads back
    let dkdv_sel = dkdv + (64 * (bn + 8) * es) as u32;
    vec![
        ("nsa_fwd_win", fwd(64)),
        ("nsa_fwd_cmp", fwd(64)),
        ("nsa_fwd_selq", fwd_selq),
        ("nsa_fwd_selkv1", kv(1)),
        ("nsa_fwd_selkv2", kv(2)),
        ("nsa_combine", 0),
        ("nsa_delta", 0),
        ("nsa_dq_win", dq(64)),
        ("nsa_dq_cmp", dq(64)),
        ("nsa_dq_selq", dq_selq),
        ("nsa_dkdv_win", dkdv),
        ("nsa_dkdv_cmp", dkdv),
        ("nsa_dkdv_sel", dkdv_sel),
        ("nsa_dkdv_reduce", 0),
        ("nsa_dq_reduce", 0),
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
    cuda::cached_cubin("nsa.cu", &cuda::source(SOURCE), &v.defines(), arch).map(|c| c.len())
}

/// Keys per tile of the Hopper range-branch forward (RangeSm90::BN in cuda/nsa.cu).
const RANGE_SM90_BN: usize = 128;

impl Variant {
    /// The Hopper range branches' module (window and compressed; 16-bit, dk == dv).
    pub fn sm90_defines(&self) -> Vec<(String, String)> {
        let mut d = self.defines();
        d.push(("NSA_SM90".into(), "1".into()));
        d.extend(cuda::sm90_common_defines());
        d
    }

    /// Every variant of the Hopper range branches (compiled by CI for sm_90a).
    pub fn all_sm90() -> Vec<Variant> {
        Variant::all()
            .into_iter()
            .filter(|v| v.elem != 0 && v.dk == v.dv)
            .collect()
    }
}

pub fn compile_sm90_variant(v: &Variant, arch: &str) -> Result<usize, String> {
    cuda::cached_cubin("nsa.cu", &cuda::source(SOURCE), &v.sm90_defines(), arch).map(|c| c.len())
}

/// The kernel-name stem of a range branch on the Hopper engine ("window" → nsa_*_win_sm90).
fn range_stem(kind: &str) -> Option<&'static str> {
    match kind {
        "window" => Some("win"),
        "compressed" => Some("cmp"),
        _ => None,
    }
}

/// The Hopper range-branch forward's variant and q, k, v tensor maps, where it applies: an
/// sm_90a device not forced onto sm_80, 16-bit inputs of one padded head dim whose layout TMA can
/// describe.
fn range_sm90(
    dev: &cuda::Device,
    p: &AttnProblem,
    q: &View,
    k: &View,
    v: &View,
) -> Option<(Variant, [cuda::TmaMap; 3])> {
    let variant = Variant::new(p.dtype, p.d, p.dv);
    if dev.arch != "sm_90a" || variant.elem == 0 || variant.dk != variant.dv || cuda::force_sm80() {
        return None;
    }
    let maps = [
        cuda::tma_map(q, cuda::SM90_BM as u32)?,
        cuda::tma_map(k, RANGE_SM90_BN as u32)?,
        cuda::tma_map(v, RANGE_SM90_BN as u32)?,
    ];
    Some((variant, maps))
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
    o_lo: Option<&'a View>,
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
        part_dq: addr(aux.part_dq),
        out_lo: 0,
        rowinfo: addr(aux.rowinfo),
        sq: cuda::opt_strides(Some(q)),
        sk: cuda::opt_strides(Some(k)),
        sv: cuda::opt_strides(Some(v)),
        so: [0; 3],
        sdo: [0; 3],
        sdq: [0; 3],
        sdk: [0; 3],
        sdv: [0; 3],
        slo: [0; 3],
        slse: cuda::opt_strides(Some(lse)),
        sidx,
        scnt: cuda::opt_strides(counts),
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
        cu_kind: cuda::int_kind(cu),
        idx_kind: cuda::int_kind(idx),
        cnt_kind: cuda::int_kind(counts),
        count_const: count_const.min(i32::MAX as i64) as i32,
        a: br.a as i32,
        bb: br.b as i32,
        nl: 0,
        chunk_tokens: aux.chunk_tokens.max(1) as i32,
        key_tiles: br.a.div_ceil(KEY_TILE) as i32,
        vec_q: cuda::rows_aligned(q) as i32,
        vec_k: cuda::rows_aligned(k) as i32,
        vec_v: cuda::rows_aligned(v) as i32,
        vec_o: 0,
        vec_do: 0,
        tp: aux.rowinfo.map_or(0, |r| r.shape[2] as i32),
        scale: scale as f32,
    })
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

/// The Hopper range-branch backward's tensor maps, where it applies: where the forward does,
/// with a dout TMA can read and the caller's row table. The dQ kernel streams k, v past a fixed
/// q, dout tile; the dK/dV kernel streams q, dout past a fixed k, v tile.
struct RangeSm90Bwd {
    variant: Variant,
    dq_maps: [cuda::TmaMap; 5],
    dkdv_maps: [cuda::TmaMap; 5],
}

fn range_sm90_bwd(
    dev: &cuda::Device,
    p: &AttnProblem,
    x: &BwdTensors,
    rowinfo: Option<&View>,
) -> Option<RangeSm90Bwd> {
    let rowinfo = rowinfo?;
    let tp = p.t.div_ceil(cuda::SM90_BWD_STREAM) * cuda::SM90_BWD_STREAM;
    if rowinfo.shape != [p.b * p.hq, cuda::SM90_ROWINFO_PLANES, tp] {
        return None;
    }
    let (variant, _) = range_sm90(dev, p, x.q, x.k, x.v)?;
    let (fixed, stream) = (cuda::SM90_BWD_FIXED as u32, cuda::SM90_BWD_STREAM as u32);
    let info = cuda::rowinfo_map(rowinfo)?;
    let dq_maps = [
        cuda::tma_map(x.q, fixed)?,
        cuda::tma_map(x.dout, fixed)?,
        cuda::tma_map(x.k, stream)?,
        cuda::tma_map(x.v, stream)?,
        info,
    ];
    let dkdv_maps = [
        cuda::tma_map(x.k, fixed)?,
        cuda::tma_map(x.v, fixed)?,
        cuda::tma_map(x.q, stream)?,
        cuda::tma_map(x.dout, stream)?,
        info,
    ];
    Some(RangeSm90Bwd {
        variant,
        dq_maps,
        dkdv_maps,
    })
}

/// The Hopper range-branch backward: the row table (lse, Δ, key range per row), then dQ
/// (query-outer) and dK/dV (key-outer), both deterministic.
fn range_sm90_backward(
    dev: &cuda::Device,
    p: &AttnProblem,
    stem: &str,
    plan: RangeSm90Bwd,
    prm: NsaParams,
    stream: usize,
) -> Result<(), String> {
    let smem = cuda::sm90_bwd_smem(plan.variant.dk);
    let (info_name, dq_name, dkdv_name) = (
        format!("nsa_rowinfo_{stem}_sm90"),
        format!("nsa_dq_{stem}_sm90"),
        format!("nsa_dkdv_{stem}_sm90"),
    );
    let kernels = dev.kernels(
        "nsa.cu",
        SOURCE,
        &plan.variant.sm90_defines(),
        &[(&info_name, 0), (&dq_name, smem), (&dkdv_name, smem)],
    )?;
    let rows = (p.b * p.hq * prm.tp as usize).div_ceil(4) as u32;
    let dq = cuda::Sm90BwdArgs {
        maps: plan.dq_maps,
        p: prm,
    };
    // (query tile, head, batch row): RangeSm90::work_tiles; (key tile, kv head, batch row):
    // RangeDkdvSm90::work_tiles
    let dq_tiles = p.t.div_ceil(cuda::SM90_BM) * p.hq * p.b;
    let dkdv_tiles = (dq.p.s as usize).div_ceil(cuda::SM90_BWD_FIXED) * p.hkv * p.b;
    // SAFETY: the args mirror NsaParams and RangeBwdSm90Args; the maps and prm describe
    // validated tensors of this device (the row table checked in range_sm90_bwd), every store is
    // bounds-checked.
    unsafe {
        dev.launch(
            kernels.get(&info_name)?,
            (rows, 1, 1),
            128,
            0,
            stream,
            &dq.p,
        )?;
        dev.launch_sm90(kernels.get(&dq_name)?, dq_tiles, smem, stream, &dq)?;
        let dkdv = cuda::Sm90BwdArgs {
            maps: plan.dkdv_maps,
            p: dq.p,
        };
        dev.launch_sm90(kernels.get(&dkdv_name)?, dkdv_tiles, smem, stream, &dkdv)
    }
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
    o_lo: Option<&View>,
    lse: &View,
    scale: f64,
    cu: Option<&View>,
    aux: &CudaAux,
) -> Result<(), String> {
    let mut prm = base_params(br, p, q, k, v, lse, scale, cu, aux)?;
    prm.out = o.addr();
    prm.so = cuda::opt_strides(Some(o));
    prm.out_lo = addr(o_lo);
    prm.slo = cuda::opt_strides(o_lo);
    prm.vec_o = cuda::rows_aligned(o) as i32;
    if p.b == 0 || p.t == 0 || p.hq == 0 {
        return Ok(());
    }
    let dev = cuda::device(ordinal)?;
    let stream = aux.stream;
    if let Some(stem) = range_stem(br.kind) {
        if let Some((variant, maps)) = range_sm90(&dev, p, q, k, v) {
            let smem = cuda::sm90_smem(variant.dk, RANGE_SM90_BN);
            let name = format!("nsa_fwd_{stem}_sm90");
            let kernels =
                dev.kernels("nsa.cu", SOURCE, &variant.sm90_defines(), &[(&name, smem)])?;
            // (token tile, head, batch row): RangeSm90::work_tiles
            let tiles = p.t.div_ceil(cuda::SM90_BM) * p.hq * p.b;
            let args = cuda::Sm90Args { maps, p: prm };
            // SAFETY: args mirrors RangeSm90Args; the maps and prm describe validated tensors of
            // this device, and every row the kernel stores is bounds-checked.
            return unsafe { dev.launch_sm90(kernels.get(&name)?, tiles, smem, stream, &args) };
        }
    }
    let variant = Variant::new(p.dtype, p.d, p.dv);
    let table = kernel_table(&variant);
    let kernels = dev.kernels("nsa.cu", SOURCE, &variant.defines(), &table)?;
    let smem = |name: &str| table.iter().find(|x| x.0 == name).map_or(0, |x| x.1);
    let g = p.hq / p.hkv;
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
                    let name = "nsa_fwd_selq";
                    let grid = ((p.t * g.div_ceil(16)) as u32, p.hkv as u32, p.b as u32);
                    dev.launch(kernels.get(name)?, grid, 128, smem(name), stream, &prm)
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
    prm.so = cuda::opt_strides(Some(x.o));
    prm.out_lo = addr(x.o_lo);
    prm.slo = cuda::opt_strides(x.o_lo);
    prm.sdo = cuda::opt_strides(Some(x.dout));
    prm.sdq = cuda::opt_strides(Some(x.dq));
    prm.sdk = cuda::opt_strides(Some(x.dk));
    prm.sdv = cuda::opt_strides(Some(x.dv));
    prm.vec_o = cuda::rows_aligned(x.o) as i32;
    prm.vec_do = cuda::rows_aligned(x.dout) as i32;
    let dev_kind = p.device;
    expect_aux(aux.delta, "delta", DType::F32, p.b * p.t * p.hq, dev_kind)?;
    if p.b == 0 || p.hq == 0 || (p.t == 0 && x.k.shape[1] == 0) {
        return Ok(());
    }
    let dev = cuda::device(ordinal)?;
    if let (Some(stem), true) = (range_stem(br.kind), p.t > 0) {
        if let Some(plan) = range_sm90_bwd(&dev, p, x, aux.rowinfo) {
            return range_sm90_backward(&dev, p, stem, plan, prm, aux.stream);
        }
    }
    let variant = Variant::new(p.dtype, p.d, p.dv);
    let table = kernel_table(&variant);
    let kernels = dev.kernels("nsa.cu", SOURCE, &variant.defines(), &table)?;
    let smem = |name: &str| table.iter().find(|x| x.0 == name).map_or(0, |x| x.1);
    let g = p.hq / p.hkv;
    let stream = aux.stream;
    let hkv = p.hkv as u32;
    let b = p.b as u32;
    let s = x.k.shape[1];
    // Δ and the dQ reduce: one warp per (token, head) row.
    let nrows = (p.b * p.t * p.hq).div_ceil(4) as u32;
    let per_row = |name: &str, prm: &NsaParams| {
        // SAFETY: as in cuda_attn_forward.
        unsafe { dev.launch(kernels.get(name)?, (nrows, 1, 1), 128, 0, stream, prm) }
    };
    // SAFETY: as in cuda_attn_forward.
    unsafe {
        if p.t > 0 {
            per_row("nsa_delta", &prm)?;
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
                // dQ: KV-outer partials (written by nsa_dkdv_sel, reduced below) or query-outer
                let kv_outer_dq = aux.part_dq.is_some();
                if kv_outer_dq {
                    let parts = p.b * p.t * p.hq * prm.n as usize * prm.key_tiles as usize * p.d;
                    expect_aux(aux.part_dq, "part_dq", DType::F32, parts, dev_kind)?;
                } else {
                    let dqn = "nsa_dq_selq";
                    let grid = ((p.t * g.div_ceil(16)) as u32, hkv, b);
                    dev.launch(kernels.get(dqn)?, grid, 128, smem(dqn), stream, &prm)?;
                }
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
                )?;
                if kv_outer_dq {
                    per_row("nsa_dq_reduce", &prm)?;
                }
                Ok(())
            }
        }
    }
}
