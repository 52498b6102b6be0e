//! NSA block selection: checks, the CPU top-k and its CUDA kernel (cuda/nsa_select.cu).

use super::*;

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

/// Key tile of the selection kernel (NS_BN in cuda/nsa_select.cu).
const SEL_BN: usize = 64;

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
    pub(super) fn compress(dtype: DType) -> SelVariant {
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
            cuda::mirror_size::<TopkParams>("TopkParams"),
            super::compress::params_mirror_size(),
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
    let limit = cuda::smem_limit(&dev.arch) - 1024; // room for the static shared memory
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
