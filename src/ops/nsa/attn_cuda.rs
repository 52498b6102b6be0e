//! The NSA attention branches on CUDA (cuda/nsa.cu): the sm_80 kernels and, on Hopper, the range
//! branches on the attention engine.

use super::*;

// ---------------------------------------------------------------------------------------------
// CUDA: the attention branches (cuda/nsa.cu). Compression and selection live elsewhere.

pub const SOURCE: &str = include_str!("../../../cuda/nsa.cu");
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
    /// window branch: W
    window: i32,
    /// compressed branch: kernel size and stride
    cmp_size: i32,
    cmp_stride: i32,
    /// selected branch: block size
    block: i32,
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
            cuda::mirror_size::<NsaParams>("NsaParams"),
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
        d.push(cuda::mirror_size::<cuda::Sm90Args<NsaParams>>(
            "RangeSm90Args",
        ));
        d.push(cuda::mirror_size::<cuda::Sm90BwdArgs<NsaParams>>(
            "RangeBwdSm90Args",
        ));
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
    if dev.arch != "sm_90a"
        || variant.elem == 0
        || variant.dk != variant.dv
        || !cuda::sm90_enabled()
    {
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
    // each kind's size argument in its own field; the other kinds' fields stay 0
    let (a, b) = (br.a as i32, br.b as i32);
    let (window, cmp_size, cmp_stride, block) = match br.kind {
        "window" => (a, 0, 0, 0),
        "compressed" => (0, a, b, 0),
        "selected" => (0, 0, 0, a),
        _ => (0, 0, 0, 0),
    };
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
        window,
        cmp_size,
        cmp_stride,
        block,
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
pub(super) fn cuda_attn_forward(
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

pub(super) fn cuda_attn_backward(
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
