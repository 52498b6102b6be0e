//! landmark_attn and landmark_topk_blocks: argument checks and dispatch to the CPU kernels
//! (src/cpu/landmark.rs) or the CUDA kernels (cuda/landmark.cu).

use super::{
    accumulator_dtype, check_cu_seqlens, expect_device, expect_dtype, expect_out_lo, expect_rank,
    expect_shape, expect_tensor, expect_unit_last_stride, float_dtypes, read_cu_seqlens,
    value_error,
};
use crate::cpu::landmark::{self as kernels, LmArgs, LmBwd, LmFwd, LmSeq, LmTopk};
use crate::cuda;
use crate::tensor::{DType, Device, View};
use pyo3::PyErr;

pub const MAX_HEAD_DIM: usize = 256;
/// Largest head dim (of q/k and of v) of the CUDA kernels.
pub const CUDA_MAX_HEAD_DIM: usize = 128;
const ANY: usize = usize::MAX;

/// Validated problem sizes shared by every direction.
struct Problem {
    b: usize,
    tq: usize,
    tk: usize,
    hq: usize,
    hkv: usize,
    d: usize,
    e: usize,
    device: Device,
    dtype: DType,
    state_dtype: DType,
    /// Number of sequences (B, or len(cu_seqlens) − 1).
    n: usize,
    /// CPU only: the sequences (CUDA kernels read cu_seqlens on the device).
    seqs: Vec<LmSeq>,
}

fn check(
    q: &View,
    k: &View,
    v: Option<&View>,
    block_size: i64,
    cu: Option<&View>,
) -> Result<Problem, PyErr> {
    for (t, name) in [(Some(q), "q"), (Some(k), "k"), (v, "v")] {
        if let Some(t) = t {
            expect_rank(t, name, 4, "[B, T, H, D]")?;
        }
    }
    let (b, tq, hq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let device = q.device;
    expect_dtype(q, "q", float_dtypes(device))?;
    let dtype = q.dtype;
    let state_dtype = accumulator_dtype(dtype);
    expect_shape(
        k,
        "k",
        &[b, ANY, ANY, d],
        "[B, Tk, Hkv, D] with q's B and D",
    )?;
    let (tk, hkv) = (k.shape[1], k.shape[2]);
    let mut e = d;
    if let Some(v) = v {
        expect_shape(
            v,
            "v",
            &[b, tk, hkv, ANY],
            "[B, Tk, Hkv, E] with k's B, Tk, Hkv",
        )?;
        e = v.shape[3];
    }
    for (name, size) in [("q", d), ("v", e)] {
        if size == 0 || size > MAX_HEAD_DIM {
            return Err(value_error(format!(
                "{name}: head dim must be between 1 and {MAX_HEAD_DIM}, got {size}"
            )));
        }
    }
    if hq == 0 || hkv == 0 || hq % hkv != 0 {
        return Err(value_error(format!(
            "k: the number of kv heads must divide the number of query heads, got Hq = {hq} and Hkv = {hkv}"
        )));
    }
    if tk < tq {
        return Err(value_error(format!(
            "k: keys must be at least as long as queries (Tk >= Tq), got Tk = {tk} and Tq = {tq}"
        )));
    }
    if block_size < 2 {
        return Err(value_error(format!(
            "block_size: must be at least 2 (one ordinary token and the landmark), got {block_size}"
        )));
    }
    for (t, name) in [(Some(k), "k"), (v, "v")] {
        if let Some(t) = t {
            expect_dtype(t, name, &[dtype])?;
            expect_device(t, name, device)?;
        }
    }
    for (t, name) in [(Some(q), "q"), (Some(k), "k"), (v, "v")] {
        if let Some(t) = t {
            expect_unit_last_stride(t, name)?;
        }
    }
    if device != Device::Cpu {
        for (name, size) in [("q", d), ("v", e)] {
            if size > CUDA_MAX_HEAD_DIM {
                return Err(value_error(format!(
                    "{name}: the CUDA kernels support head dims up to {CUDA_MAX_HEAD_DIM}, got {size}"
                )));
            }
        }
    }
    let mut n = b;
    let seqs = match cu {
        None => (0..b)
            .map(|i| LmSeq {
                batch: i,
                q_start: 0,
                q_len: tq,
                k_start: 0,
                k_len: tk,
            })
            .collect(),
        Some(cu) => {
            check_cu_seqlens(cu, device, b)?;
            if tk != tq {
                return Err(value_error(format!(
                    "cu_seqlens: packed sequences need as many keys as queries, got Tk = {tk} and Tq = {tq}"
                )));
            }
            n = cu.shape[0] - 1;
            if device != Device::Cpu {
                Vec::new() // the kernels read cu_seqlens on the device (no host synchronisation)
            } else {
                let starts = read_cu_seqlens(cu, tq)?;
                starts
                    .windows(2)
                    .map(|w| LmSeq {
                        batch: 0,
                        q_start: w[0],
                        q_len: w[1] - w[0],
                        k_start: w[0],
                        k_len: w[1] - w[0],
                    })
                    .collect()
            }
        }
    };
    if device != Device::Cpu && (n > 65535 || hq > 65535) {
        return Err(value_error(format!(
            "q: at most 65535 sequences and heads are supported on CUDA, got {n} and {hq}"
        )));
    }
    Ok(Problem {
        b,
        tq,
        tk,
        hq,
        hkv,
        d,
        e,
        device,
        dtype,
        state_dtype,
        n,
        seqs,
    })
}

impl Problem {
    fn expect(
        &self,
        t: &View,
        name: &str,
        shape: &[usize],
        what: &str,
        dtype: DType,
    ) -> Result<(), PyErr> {
        expect_tensor(t, name, shape, what, dtype, self.device)?;
        if t.ndim() == 4 {
            expect_unit_last_stride(t, name)?;
        }
        Ok(())
    }

    fn check_indices(&self, bi: Option<&View>) -> Result<(), PyErr> {
        if let Some(bi) = bi {
            expect_shape(
                bi,
                "block_indices",
                &[self.b, self.tq, self.hkv, ANY],
                "[B, Tq, Hkv, n] with q's B, Tq and k's Hkv",
            )?;
            expect_dtype(bi, "block_indices", &[DType::I32])?;
            expect_device(bi, "block_indices", self.device)?;
        }
        Ok(())
    }

    fn args<'a>(
        &'a self,
        q: &'a View,
        k: &'a View,
        v: &'a View,
        bi: Option<&'a View>,
        block_size: i64,
        scale: f64,
    ) -> LmArgs<'a> {
        LmArgs {
            q,
            k,
            v,
            block_indices: bi,
            seqs: &self.seqs,
            block: block_size as usize,
            scale,
            hq: self.hq,
            hkv: self.hkv,
        }
    }
}

/// Forward: writes out [B, Tq, Hq, E], lse [B, Tq, Hq] and, when given, out_lo (out's rounding
/// residual, laid out like out).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &View,
    k: &View,
    v: &View,
    out: &View,
    out_lo: Option<&View>,
    lse: &View,
    block_indices: Option<&View>,
    block_size: i64,
    scale: f64,
    cu: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check(q, k, Some(v), block_size, cu)?;
    p.check_indices(block_indices)?;
    p.expect(
        out,
        "out",
        &[p.b, p.tq, p.hq, p.e],
        "[B, Tq, Hq, E]",
        p.dtype,
    )?;
    expect_out_lo(out_lo, out)?;
    p.expect(lse, "lse", &[p.b, p.tq, p.hq], "[B, Tq, Hq]", p.state_dtype)?;
    if let Device::Cuda(ordinal) = p.device {
        let mut prm = p.params(q, k, Some(v), block_size, scale, cu);
        prm.out = out.addr();
        prm.out_lo = out_lo.map_or(0, |t| t.addr());
        prm.so = cuda::strides(out);
        prm.lse = lse.addr();
        prm.slse = cuda::strides(lse);
        set_indices(&mut prm, block_indices);
        if let Some(hopper) = Sm90Plan::new(&p, ordinal, q, k, v, prm.bs as usize)? {
            return hopper.launch(&p, prm, stream).map_err(value_error);
        }
        return launch(&p, ordinal, Dir::Fwd, &prm, stream).map_err(value_error);
    }
    let a = p.args(q, k, v, block_indices, block_size, scale);
    kernels::forward(&a, &LmFwd { out, out_lo, lse });
    Ok(())
}

/// Backward: writes dq, dk, dv from grad_out, lse and delta = Σ_e grad_out·out.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &View,
    k: &View,
    v: &View,
    dout: &View,
    lse: &View,
    delta: &View,
    dq: &View,
    dk: &View,
    dv: &View,
    block_indices: Option<&View>,
    block_size: i64,
    scale: f64,
    cu: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check(q, k, Some(v), block_size, cu)?;
    p.check_indices(block_indices)?;
    p.expect(
        dout,
        "grad_out",
        &[p.b, p.tq, p.hq, p.e],
        "[B, Tq, Hq, E]",
        p.dtype,
    )?;
    p.expect(lse, "lse", &[p.b, p.tq, p.hq], "[B, Tq, Hq]", p.state_dtype)?;
    p.expect(
        delta,
        "delta",
        &[p.b, p.tq, p.hq],
        "[B, Tq, Hq]",
        p.state_dtype,
    )?;
    p.expect(dq, "dq", &[p.b, p.tq, p.hq, p.d], "like q", p.dtype)?;
    p.expect(dk, "dk", &[p.b, p.tk, p.hkv, p.d], "like k", p.dtype)?;
    p.expect(dv, "dv", &[p.b, p.tk, p.hkv, p.e], "like v", p.dtype)?;
    if let Device::Cuda(ordinal) = p.device {
        let mut prm = p.params(q, k, Some(v), block_size, scale, cu);
        prm.dout = dout.addr();
        prm.sdo = cuda::strides(dout);
        prm.vec_do = cuda::rows_aligned(dout) as i32;
        prm.lse = lse.addr();
        prm.slse = cuda::strides(lse);
        prm.delta = delta.addr();
        prm.sdl = cuda::strides(delta);
        prm.dq = dq.addr();
        prm.sdq = cuda::strides(dq);
        prm.dk = dk.addr();
        prm.sdk = cuda::strides(dk);
        prm.dv = dv.addr();
        prm.sdv = cuda::strides(dv);
        set_indices(&mut prm, block_indices);
        launch(&p, ordinal, Dir::BwdDq, &prm, stream).map_err(value_error)?;
        return launch(&p, ordinal, Dir::BwdDkdv, &prm, stream).map_err(value_error);
    }
    let a = p.args(q, k, v, block_indices, block_size, scale);
    let g = LmBwd {
        dout,
        lse,
        delta,
        dq,
        dk,
        dv,
    };
    kernels::backward(&a, &g);
    Ok(())
}

/// Top-k landmark blocks: writes out [B, Tq, Hkv, topk] int32.
pub fn topk_blocks(
    q: &View,
    k: &View,
    out: &View,
    block_size: i64,
    scale: f64,
    cu: Option<&View>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check(q, k, None, block_size, cu)?;
    expect_shape(
        out,
        "out",
        &[p.b, p.tq, p.hkv, ANY],
        "[B, Tq, Hkv, topk] with q's B, Tq and k's Hkv",
    )?;
    expect_dtype(out, "out", &[DType::I32])?;
    expect_device(out, "out", p.device)?;
    if let Device::Cuda(ordinal) = p.device {
        let mut prm = p.params(q, k, None, block_size, scale, cu);
        prm.topk_out = out.addr();
        prm.stk = cuda::strides(out);
        prm.topk = out.shape[3] as i32;
        return launch(&p, ordinal, Dir::Topk, &prm, stream).map_err(value_error);
    }
    let a = LmTopk {
        q,
        k,
        out,
        seqs: &p.seqs,
        block: block_size as usize,
        scale,
        hq: p.hq,
        hkv: p.hkv,
    };
    kernels::topk_blocks(&a);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// CUDA

pub const SOURCE: &str = include_str!("../../cuda/landmark.cu");
/// Keys per key tile (LM_KT); a tile holds KT / block_size whole blocks, or (block_size > KT)
/// part of one block.
const KT: usize = 64;
/// Query rows per CTA (LM_BQ) and threads per CTA (LM_THREADS, TOPK_THREADS).
const BQ: usize = 64;
const THREADS: u32 = 128;
/// Dynamic shared memory of the top-k kernel at most (below the opt-in limit of sm_80, 163 KiB,
/// and of sm_90, 227 KiB, with room for its static shared memory).
const TOPK_SMEM: usize = 160 * 1024;

/// Kernel parameters, laid out exactly like `LmParams` in cuda/landmark.cu.
#[repr(C)]
#[derive(Default)]
struct LmParams {
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    out_lo: u64,
    lse: u64,
    dout: u64,
    delta: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    bidx: u64,
    cu_seqlens: u64,
    topk_out: u64,
    sq: [i64; 3],
    sk: [i64; 3],
    sv: [i64; 3],
    so: [i64; 3],
    sdo: [i64; 3],
    sdq: [i64; 3],
    sdk: [i64; 3],
    sdv: [i64; 3],
    slse: [i64; 3],
    sdl: [i64; 3],
    sbi: [i64; 4],
    stk: [i64; 4],
    tq: i32,
    tk: i32,
    hq: i32,
    hkv: i32,
    d: i32,
    e: i32,
    bs: i32,
    nidx: i32,
    topk: i32,
    nseq: i32,
    cu_kind: i32,
    vec_q: i32,
    vec_k: i32,
    vec_v: i32,
    vec_do: i32,
    scale: f32,
    scale_log2: f32,
}

/// Compile-time configuration of one kernel module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    /// 0 f32 (3xTF32), 1 f16, 2 bf16
    pub elem: u32,
    /// padded head dim of q/k and v (32, 64, 128)
    pub dp: usize,
    /// KT/2 < block_size <= KT: a key tile is exactly one landmark block (LM_ONE fast path)
    pub one: bool,
    /// block_size > KT: a block spans several key tiles (LM_MULTI: a statistics pass per block)
    pub multi: bool,
}

impl Variant {
    fn new(dtype: DType, d: usize, e: usize, bs: usize) -> Variant {
        let elem = match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            _ => 2,
        };
        let dp = match d.max(e) {
            0..=32 => 32,
            33..=64 => 64,
            _ => 128,
        };
        Variant {
            elem,
            dp,
            one: 2 * bs > KT && bs <= KT,
            multi: bs > KT,
        }
    }

    pub fn defines(&self) -> Vec<(String, String)> {
        vec![
            ("LM_ELEM".into(), self.elem.to_string()),
            ("LM_DP".into(), self.dp.to_string()),
            ("LM_KT".into(), KT.to_string()),
            ("LM_ONE".into(), (self.one as u32).to_string()),
            ("LM_MULTI".into(), (self.multi as u32).to_string()),
            cuda::mirror_size::<LmParams>("LmParams"),
        ]
    }

    fn elem_bytes(&self) -> usize {
        if self.elem == 0 {
            4
        } else {
            2
        }
    }

    fn pad(&self) -> usize {
        if self.elem == 0 {
            4
        } else {
            8
        }
    }

    /// Dynamic shared memory of the forward: Q, K, V tiles.
    fn smem_fwd(&self) -> u32 {
        ((BQ + 2 * KT) * (self.dp + self.pad()) * self.elem_bytes()) as u32
    }

    /// dQ: Q, dO, K, V tiles.
    fn smem_dq(&self) -> u32 {
        ((2 * BQ + 2 * KT) * (self.dp + self.pad()) * self.elem_bytes()) as u32
    }

    /// dK/dV: K, V, Q, dO tiles plus the P/dS tile.
    fn smem_dkdv(&self) -> u32 {
        (((2 * BQ + 2 * KT) * (self.dp + self.pad()) + BQ * (KT + self.pad())) * self.elem_bytes())
            as u32
    }

    /// Every variant the dispatcher can choose (compiled by CI for sm_80 and sm_90a).
    pub fn all() -> Vec<Variant> {
        let mut out = Vec::new();
        for elem in 0..3 {
            for dp in [32, 64, 128] {
                for (one, multi) in [(false, false), (true, false), (false, true)] {
                    out.push(Variant {
                        elem,
                        dp,
                        one,
                        multi,
                    });
                }
            }
        }
        out
    }
}

/// The Hopper forward (cuda/attn_sm90.cuh with the landmark policy): one module per dtype, padded
/// head dim and block size; the block size is a compile-time constant so that the row phase keeps
/// its per-block state in registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sm90Variant {
    /// 1 f16, 2 bf16
    pub elem: u32,
    /// padded head dim of q/k and v (64, 128)
    pub dp: usize,
    /// landmark block size (one of SM90_BLOCKS)
    pub bs: usize,
}

/// Block sizes of the Hopper forward and the keys per tile of each (whole blocks: block 51 takes 2
/// blocks in a 112-key tile; wider tiles of more blocks spill registers). Other sizes run the
/// sm_80 kernels.
const SM90_BLOCKS: [(usize, usize); 5] = [(16, 64), (32, 128), (51, 112), (64, 128), (128, 128)];

impl Sm90Variant {
    fn tile(&self) -> usize {
        SM90_BLOCKS
            .iter()
            .find(|b| b.0 == self.bs)
            .map_or(128, |b| b.1)
    }

    pub fn defines(&self) -> Vec<(String, String)> {
        let mut d = Variant {
            elem: self.elem,
            dp: self.dp,
            one: false,
            multi: false,
        }
        .defines();
        d.push(("LM_SM90".into(), "1".into()));
        d.extend(cuda::sm90_common_defines());
        d.push(("LM_BS".into(), self.bs.to_string()));
        d.push(("LM_BN".into(), self.tile().to_string()));
        d.push(cuda::mirror_size::<cuda::Sm90Args<LmParams>>("LmSm90Args"));
        d
    }

    pub fn all() -> Vec<Sm90Variant> {
        let mut out = Vec::new();
        for elem in 1..3 {
            for dp in [64, 128] {
                for (bs, _) in SM90_BLOCKS {
                    out.push(Sm90Variant { elem, dp, bs });
                }
            }
        }
        out
    }
}

pub fn compile_sm90_variant(v: &Sm90Variant, arch: &str) -> Result<usize, String> {
    cuda::cached_cubin("landmark.cu", &cuda::source(SOURCE), &v.defines(), arch).map(|c| c.len())
}

/// A forward that runs on the Hopper engine: the variant and the q, k, v tensor maps.
struct Sm90Plan {
    dev: std::sync::Arc<cuda::Device>,
    variant: Sm90Variant,
    maps: [cuda::TmaMap; 3],
}

impl Sm90Plan {
    /// Some(plan) on an sm_90a device (with LONGATTN_LANDMARK_SM90=1, unless forced onto sm_80)
    /// for 16-bit inputs whose layout TMA can describe and block sizes that fit a tile; None: the
    /// sm_80 kernels run.
    fn new(
        p: &Problem,
        ordinal: i32,
        q: &View,
        k: &View,
        v: &View,
        bs: usize,
    ) -> Result<Option<Sm90Plan>, PyErr> {
        if p.dtype == DType::F32 || !cuda::sm90_enabled() || !cuda::landmark_sm90_enabled() {
            return Ok(None);
        }
        let dev = cuda::device(ordinal).map_err(value_error)?;
        if !SM90_BLOCKS.iter().any(|b| b.0 == bs) {
            return Ok(None);
        }
        let variant = Sm90Variant {
            elem: if p.dtype == DType::F16 { 1 } else { 2 },
            dp: if p.d.max(p.e) <= 64 { 64 } else { 128 },
            bs,
        };
        let bn = variant.tile();
        if dev.arch != "sm_90a" || p.tq > i32::MAX as usize || p.tk > i32::MAX as usize {
            return Ok(None);
        }
        let maps = match (
            cuda::tma_map(q, cuda::SM90_BM as u32),
            cuda::tma_map(k, bn as u32),
            cuda::tma_map(v, bn as u32),
        ) {
            (Some(mq), Some(mk), Some(mv)) => [mq, mk, mv],
            _ => return Ok(None),
        };
        Ok(Some(Sm90Plan { dev, variant, maps }))
    }

    fn launch(self, p: &Problem, prm: LmParams, stream: usize) -> Result<(), String> {
        if p.b == 0 || p.tq == 0 || p.n == 0 || p.hq == 0 {
            return Ok(());
        }
        let smem = cuda::sm90_smem(self.variant.dp, self.variant.tile());
        let kernels = self.dev.kernels(
            "landmark.cu",
            SOURCE,
            &self.variant.defines(),
            &[("lm_fwd_sm90", smem)],
        )?;
        // (query tile, head, sequence): LmSm90::work_tiles
        let tiles = p.tq.div_ceil(cuda::SM90_BM) * p.hq * p.n;
        let args = cuda::Sm90Args {
            maps: self.maps,
            p: prm,
        };
        // SAFETY: args mirrors LmSm90Args; the maps and prm describe validated tensors of this
        // device, and every row the kernel stores is bounds-checked.
        unsafe {
            self.dev
                .launch_sm90(kernels.get("lm_fwd_sm90")?, tiles, smem, stream, &args)
        }
    }
}

pub fn compile_variant(v: &Variant, arch: &str) -> Result<usize, String> {
    cuda::cached_cubin("landmark.cu", &cuda::source(SOURCE), &v.defines(), arch).map(|c| c.len())
}

fn set_indices(prm: &mut LmParams, bi: Option<&View>) {
    if let Some(bi) = bi {
        if bi.shape[3] > 0 {
            prm.bidx = bi.addr();
            prm.sbi = cuda::strides(bi);
            prm.nidx = bi.shape[3] as i32;
        } else {
            // an empty list: only the current block takes part; a non-null pointer with no
            // entries keeps the kernels in retrieval mode
            prm.bidx = bi.addr().max(1);
            prm.nidx = 0;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    Fwd,
    BwdDq,
    BwdDkdv,
    Topk,
}

impl Problem {
    fn params(
        &self,
        q: &View,
        k: &View,
        v: Option<&View>,
        block_size: i64,
        scale: f64,
        cu: Option<&View>,
    ) -> LmParams {
        LmParams {
            q: q.addr(),
            k: k.addr(),
            v: v.map_or(0, |v| v.addr()),
            cu_seqlens: cu.map_or(0, |c| c.addr()),
            sq: cuda::strides(q),
            sk: cuda::strides(k),
            sv: cuda::opt_strides(v),
            tq: self.tq as i32,
            tk: self.tk as i32,
            hq: self.hq as i32,
            hkv: self.hkv as i32,
            d: self.d as i32,
            e: self.e as i32,
            // a block longer than the keys behaves like one of Tk + 1 (no landmark in reach):
            // keeps the CUDA grid and the kernels' int arithmetic small for huge block sizes
            bs: block_size.min(self.tk as i64 + 1).max(2) as i32,
            nseq: self.n as i32,
            cu_kind: cu.map_or(-1, |c| if c.dtype == DType::I64 { 1 } else { 0 }),
            vec_q: cuda::rows_aligned(q) as i32,
            vec_k: cuda::rows_aligned(k) as i32,
            vec_v: v.is_some_and(cuda::rows_aligned) as i32,
            scale: scale as f32,
            scale_log2: (scale * std::f64::consts::LOG2_E) as f32,
            ..Default::default()
        }
    }
}

fn launch(
    p: &Problem,
    ordinal: i32,
    dir: Dir,
    prm: &LmParams,
    stream: usize,
) -> Result<(), String> {
    if p.b == 0 || p.tq == 0 || p.n == 0 || p.hq == 0 {
        return Ok(());
    }
    if p.tq > i32::MAX as usize || p.tk > i32::MAX as usize {
        return Err("landmark_attn: sequences longer than 2^31 - 1 tokens".into());
    }
    let dev = cuda::device(ordinal)?;
    let variant = Variant::new(p.dtype, p.d, p.e, prm.bs as usize);
    let kernels = dev.kernels(
        "landmark.cu",
        SOURCE,
        &variant.defines(),
        &[
            ("lm_fwd", variant.smem_fwd()),
            ("lm_bwd_dq", variant.smem_dq()),
            ("lm_bwd_dkdv", variant.smem_dkdv()),
            ("lm_topk", TOPK_SMEM as u32),
        ],
    )?;
    let bs = prm.bs as usize;
    let (name, grid, smem) = match dir {
        Dir::Fwd | Dir::BwdDq => {
            let grid = (p.tq.div_ceil(BQ) as u32, p.hq as u32, p.n as u32);
            if dir == Dir::Fwd {
                ("lm_fwd", grid, variant.smem_fwd())
            } else {
                ("lm_bwd_dq", grid, variant.smem_dq())
            }
        }
        Dir::BwdDkdv => {
            if p.tk == 0 {
                return Ok(());
            }
            // one CTA per key tile: tiles of whole blocks, or every tile of every block
            let tiles = if variant.multi {
                p.tk.div_ceil(bs) * bs.div_ceil(KT)
            } else {
                p.tk.div_ceil((KT / bs) * bs)
            };
            let grid = (tiles as u32, p.hkv as u32, p.n as u32);
            ("lm_bwd_dkdv", grid, variant.smem_dkdv())
        }
        Dir::Topk => {
            if prm.topk == 0 {
                return Ok(());
            }
            let g = p.hq / p.hkv;
            let blocks = p.tk / bs;
            let smem = 8 * (g * p.d + blocks);
            if smem > TOPK_SMEM {
                return Err(format!(
                    "landmark_topk_blocks: the CUDA kernel keeps one score per block and q of the \
                     kv group in shared memory ({smem} bytes for {blocks} blocks and {g} heads of \
                     dim {}); at most {TOPK_SMEM} bytes",
                    p.d
                ));
            }
            let grid = (p.tq as u32, p.hkv as u32, p.b as u32);
            ("lm_topk", grid, smem as u32)
        }
    };
    if grid.0 == 0 {
        return Ok(());
    }
    // SAFETY: prm mirrors LmParams; all pointers come from validated tensors on this device.
    unsafe { dev.launch(kernels.get(name)?, grid, THREADS, smem, stream, prm) }
}
