//! rat_attn: argument checks and dispatch (docs/api/rat.md): Rust CPU kernels (src/cpu/rat.rs) or
//! the CUDA kernels of cuda/rat.cu (scratch buffers allocated by python/longattn/ops/rat.py).

use super::{
    accumulator_dtype, check_cu_seqlens, expect_device, expect_dtype, expect_out_lo, expect_rank,
    expect_shape, expect_tensor, expect_unit_last_stride, float_dtypes, read_cu_seqlens,
    value_error,
};
use crate::cpu::rat::{RatArgs, RatGrads, Seq};
use crate::cuda;
use crate::tensor::{DType, Device, View};
use pyo3::PyErr;

pub const MAX_HEAD_DIM: usize = 256;

/// Validated problem sizes shared by the forward and the backward.
struct Problem {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
    device: Device,
    dtype: DType,
    state_dtype: DType,
    /// Number of sequences (B, or len(cu_seqlens) − 1).
    n: usize,
    /// Chunk slots of the state tensors: ⌈T/L⌉, or (T + N(L − 1)) / L with cu_seqlens.
    chunks: usize,
    seqs: Vec<Seq>,
}

/// Number of chunk slots of the `k_states`/`v_states` tensors ([B, C, H, D]). With cu_seqlens,
/// sequence n's chunks start at slot (cu[n] + n(L − 1)) / L, which needs no prefix sum.
pub fn state_chunks(t: usize, chunk: usize, num_seqs: Option<usize>) -> usize {
    match num_seqs {
        None => t.div_ceil(chunk),
        Some(n) => (t + n * (chunk - 1)) / chunk,
    }
}

#[allow(clippy::too_many_arguments)]
fn check(
    q: &View,
    k: &View,
    v: &View,
    g: &View,
    chunk: i64,
    scale: f64,
    rope_theta: Option<f64>,
    cu: Option<&View>,
) -> Result<Problem, PyErr> {
    expect_rank(q, "q", 4, "[B, T, H, D]")?;
    let (b, t, h, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let device = q.device;
    expect_dtype(q, "q", float_dtypes(device))?;
    let dtype = q.dtype;
    let state_dtype = accumulator_dtype(dtype);
    for (t_, name) in [(k, "k"), (v, "v"), (g, "g")] {
        expect_shape(t_, name, &[b, t, h, d], "[B, T, H, D] like q")?;
        expect_device(t_, name, device)?;
    }
    expect_dtype(k, "k", &[dtype])?;
    expect_dtype(v, "v", &[dtype])?;
    if dtype == DType::F32 {
        expect_dtype(g, "g", &[DType::F32])?;
    } else {
        expect_dtype(g, "g", &[dtype, DType::F32])?;
    }
    for (t_, name) in [(q, "q"), (k, "k"), (v, "v"), (g, "g")] {
        expect_unit_last_stride(t_, name)?;
    }
    if d == 0 || d > MAX_HEAD_DIM {
        return Err(value_error(format!(
            "q: head dim must be between 1 and {MAX_HEAD_DIM}, got {d}"
        )));
    }
    if chunk < 1 {
        return Err(value_error(format!(
            "chunk_size: must be at least 1, got {chunk}"
        )));
    }
    let chunk = chunk as usize;
    if !scale.is_finite() {
        return Err(value_error(format!(
            "scale: must be a finite number, got {scale}"
        )));
    }
    if let Some(base) = rope_theta {
        if !(base.is_finite() && base > 0.0) {
            return Err(value_error(format!(
                "rope_theta: must be a positive number or None, got {base}"
            )));
        }
        if d % 2 != 0 {
            return Err(value_error(format!(
                "q: RoPE (rope_theta set) needs an even head dim, got {d}; pass rope_theta=None"
            )));
        }
    }
    if let Device::Cuda(_) = device {
        let max = cuda_max_head_dim(dtype);
        if d > max {
            return Err(value_error(format!(
                "q: head dim {d} is not supported by the CUDA kernels for {} (at most {max})",
                dtype.name()
            )));
        }
        if h > 65535 || b > 65535 {
            return Err(value_error(format!(
                "q: at most 65535 sequences and heads are supported on CUDA, got B = {b}, H = {h}"
            )));
        }
    }
    let (chunks, seqs) = match cu {
        Some(cu) if device != Device::Cpu => {
            let n = check_cu_seqlens(cu, device, b)?;
            if n > 65535 {
                return Err(value_error(format!(
                    "cu_seqlens: at most 65535 sequences are supported on CUDA, got {n}"
                )));
            }
            // the kernels read cu_seqlens on the device (no host synchronisation)
            (state_chunks(t, chunk, Some(n)), Vec::new())
        }
        None => (
            state_chunks(t, chunk, None),
            (0..b)
                .map(|i| Seq {
                    batch: i,
                    start: 0,
                    len: t,
                    chunk0: 0,
                })
                .collect(),
        ),
        Some(cu) => {
            check_cu_seqlens(cu, device, b)?;
            let n = cu.shape[0] - 1;
            let starts = read_cu_seqlens(cu, t)?;
            let seqs = starts
                .windows(2)
                .enumerate()
                .map(|(i, w)| Seq {
                    batch: 0,
                    start: w[0],
                    len: w[1] - w[0],
                    chunk0: (w[0] + i * (chunk - 1)) / chunk,
                })
                .collect();
            (state_chunks(t, chunk, Some(n)), seqs)
        }
    };
    let n = cu.map_or(b, |c| c.shape[0] - 1);
    Ok(Problem {
        b,
        t,
        h,
        d,
        device,
        dtype,
        state_dtype,
        n,
        chunks,
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
        expect_unit_last_stride(t, name)
    }

    fn tokens(&self) -> [usize; 4] {
        [self.b, self.t, self.h, self.d]
    }

    /// out, lse, k_states, v_states.
    fn expect_saved(&self, out: &View, lse: &View, ks: &View, vs: &View) -> Result<(), PyErr> {
        self.expect(
            out,
            "out",
            &self.tokens(),
            "[B, T, H, D] like q",
            self.dtype,
        )?;
        self.expect(
            lse,
            "lse",
            &[self.b, self.t, self.h],
            "[B, T, H]",
            self.state_dtype,
        )?;
        let st = [self.b, self.chunks, self.h, self.d];
        self.expect(ks, "k_states", &st, "[B, C, H, D]", self.state_dtype)?;
        self.expect(vs, "v_states", &st, "[B, C, H, D]", self.state_dtype)
    }
}

/// Scratch buffers of the CUDA path (allocated by ops/rat.py; see `cuda_scratch_shapes`).
pub struct Scratch<'a> {
    /// Rotated chunk-final keys and values in the input dtype, [B, C, H, D] contiguous.
    pub kr: &'a View,
    pub ve: &'a View,
    /// Scan states entering every 64-token sub-tile (L > 64), [B, C·TPC, H, D] float32.
    pub carry_k: &'a View,
    pub carry_v: &'a View,
    /// Backward only: Δ [B, T, H] and dK̃, dṼ [B, C, H, D], float32 contiguous.
    pub delta: Option<&'a View>,
    pub dks: Option<&'a View>,
    pub dvs: Option<&'a View>,
}

/// Forward: writes out, lse, the chunk-final states and, when given, out_lo (out's rounding
/// residual, laid out like out).
#[allow(clippy::too_many_arguments)]
pub fn forward(
    q: &View,
    k: &View,
    v: &View,
    g: &View,
    out: &View,
    out_lo: Option<&View>,
    lse: &View,
    ks: &View,
    vs: &View,
    chunk: i64,
    scale: f64,
    rope_theta: Option<f64>,
    cu: Option<&View>,
    scratch: Option<&Scratch>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check(q, k, v, g, chunk, scale, rope_theta, cu)?;
    p.expect_saved(out, lse, ks, vs)?;
    expect_out_lo(out_lo, out)?;
    let args = RatArgs {
        q,
        k,
        v,
        g,
        out,
        out_lo,
        lse,
        ks,
        vs,
        seqs: &p.seqs,
        chunk: chunk as usize,
        scale,
        rope_theta,
    };
    match p.device {
        Device::Cpu => {
            crate::cpu::rat::forward(&args);
            Ok(())
        }
        Device::Cuda(ordinal) => {
            let sc = p.check_scratch(scratch, chunk as usize, false)?;
            launch(&p, &args, None, sc, cu, ordinal, stream).map_err(value_error)
        }
    }
}

/// Backward: writes dq, dk, dv (input dtype) and dg (g's dtype) from the forward's saved out
/// (plus out_lo when given: Δ = dy·(out + out_lo)), lse and chunk-final states.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    q: &View,
    k: &View,
    v: &View,
    g: &View,
    out: &View,
    out_lo: Option<&View>,
    lse: &View,
    ks: &View,
    vs: &View,
    dout: &View,
    dq: &View,
    dk: &View,
    dv: &View,
    dg: &View,
    chunk: i64,
    scale: f64,
    rope_theta: Option<f64>,
    cu: Option<&View>,
    scratch: Option<&Scratch>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check(q, k, v, g, chunk, scale, rope_theta, cu)?;
    p.expect_saved(out, lse, ks, vs)?;
    expect_out_lo(out_lo, out)?;
    let tok = p.tokens();
    p.expect(dout, "grad_out", &tok, "[B, T, H, D] like q", p.dtype)?;
    p.expect(dq, "dq", &tok, "like q", p.dtype)?;
    p.expect(dk, "dk", &tok, "like k", p.dtype)?;
    p.expect(dv, "dv", &tok, "like v", p.dtype)?;
    p.expect(dg, "dg", &tok, "like g", g.dtype)?;
    let args = RatArgs {
        q,
        k,
        v,
        g,
        out,
        out_lo,
        lse,
        ks,
        vs,
        seqs: &p.seqs,
        chunk: chunk as usize,
        scale,
        rope_theta,
    };
    let grads = RatGrads {
        dout,
        dq,
        dk,
        dv,
        dg,
    };
    match p.device {
        Device::Cpu => {
            crate::cpu::rat::backward(&args, &grads);
            Ok(())
        }
        Device::Cuda(ordinal) => {
            let sc = p.check_scratch(scratch, chunk as usize, true)?;
            launch(&p, &args, Some(&grads), sc, cu, ordinal, stream).map_err(value_error)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA

const SOURCE: &str = include_str!("../../cuda/rat.cu");
const THREADS: u32 = 128;

/// Largest head dim of the CUDA kernels for a dtype (the f32 backward at 256 would not fit in
/// shared memory).
pub fn cuda_max_head_dim(dtype: DType) -> usize {
    if dtype == DType::F32 {
        128
    } else {
        256
    }
}

/// Sub-tiles per chunk (L > 64) for the carries: ⌈L/64⌉, 1 for L ≤ 64.
pub fn tiles_per_chunk(chunk: usize) -> usize {
    if chunk <= 64 {
        1
    } else {
        chunk.div_ceil(64)
    }
}

impl Problem {
    fn check_scratch<'a>(
        &self,
        scratch: Option<&'a Scratch<'a>>,
        chunk: usize,
        backward: bool,
    ) -> Result<&'a Scratch<'a>, PyErr> {
        let sc =
            scratch.ok_or_else(|| value_error("rat: CUDA tensors need the scratch buffers"))?;
        let st = [self.b, self.chunks, self.h, self.d];
        for (t, name) in [(sc.kr, "kr"), (sc.ve, "ve")] {
            expect_tensor(t, name, &st, "[B, C, H, D]", self.dtype, self.device)?;
        }
        let carry_slots = if chunk > 64 {
            self.chunks * tiles_per_chunk(chunk)
        } else {
            1
        };
        let cs = [self.b, carry_slots, self.h, self.d];
        for (t, name) in [(sc.carry_k, "carry_k"), (sc.carry_v, "carry_v")] {
            expect_tensor(t, name, &cs, "[B, C·TPC, H, D]", DType::F32, self.device)?;
        }
        let mut all = vec![sc.kr, sc.ve, sc.carry_k, sc.carry_v];
        if backward {
            let (Some(delta), Some(dks), Some(dvs)) = (sc.delta, sc.dks, sc.dvs) else {
                return Err(value_error("rat: the CUDA backward needs delta, dks, dvs"));
            };
            expect_tensor(
                delta,
                "delta",
                &[self.b, self.t, self.h],
                "[B, T, H]",
                DType::F32,
                self.device,
            )?;
            for (t, name) in [(dks, "dks"), (dvs, "dvs")] {
                expect_tensor(t, name, &st, "[B, C, H, D]", DType::F32, self.device)?;
            }
            all.extend([delta, dks, dvs]);
        }
        if !all.into_iter().all(contiguous) {
            return Err(value_error("rat: scratch buffers must be contiguous"));
        }
        Ok(sc)
    }
}

/// Whether `t` is dense in row-major order (size-1 dimensions may have any stride).
fn contiguous(t: &View) -> bool {
    if t.shape.contains(&0) {
        return true; // an empty tensor's strides are arbitrary
    }
    let mut s = 1isize;
    for i in (0..t.shape.len()).rev() {
        if t.shape[i] > 1 && t.strides[i] != s {
            return false;
        }
        s *= t.shape[i] as isize;
    }
    true
}

/// Kernel parameters, laid out exactly like `RatParams` in cuda/rat.cu.
#[repr(C)]
struct RatParams {
    q: u64,
    k: u64,
    v: u64,
    g: u64,
    out: u64,
    out_lo: u64,
    dout: u64,
    lse: u64,
    ks: u64,
    vs: u64,
    kr: u64,
    ve: u64,
    carry_k: u64,
    carry_v: u64,
    delta: u64,
    dks: u64,
    dvs: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dg: u64,
    cu_seqlens: u64,
    sq: [i64; 3],
    sk: [i64; 3],
    sv: [i64; 3],
    sg: [i64; 3],
    so: [i64; 3],
    sdo: [i64; 3],
    slse: [i64; 3],
    sks: [i64; 3],
    svs: [i64; 3],
    sdq: [i64; 3],
    sdk: [i64; 3],
    sdv: [i64; 3],
    sdg: [i64; 3],
    srot: [i64; 3],
    scar: [i64; 3],
    log2_base: f64,
    rope: i32,
    t: i32,
    h: i32,
    d: i32,
    l: i32,
    tq: i32,
    tpc: i32,
    cu_kind: i32,
    g_f32: i32,
    mode: i32,
    write_states: i32,
    vec_rot: i32,
    vec_do: i32,
    vec_q: i32,
    scale: f32,
}

/// Compile-time configuration of one kernel variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Variant {
    pub elem: u32,
    pub dk: usize,
}

impl Variant {
    fn new(dtype: DType, d: usize) -> Variant {
        let elem = match dtype {
            DType::F32 => 0,
            DType::F16 => 1,
            _ => 2,
        };
        let dk = match d {
            0..=16 => 16,
            17..=32 => 32,
            33..=64 => 64,
            65..=128 => 128,
            _ => 256,
        };
        Variant { elem, dk }
    }

    pub fn defines(&self) -> Vec<(String, String)> {
        vec![
            ("RAT_ELEM".into(), self.elem.to_string()),
            ("RAT_DK".into(), self.dk.to_string()),
            cuda::mirror_size::<RatParams>("RatParams"),
            cuda::mirror_size::<RatDecodeParams>("RatDecodeParams"),
        ]
    }

    fn esize(&self) -> usize {
        if self.elem == 0 {
            4
        } else {
            2
        }
    }

    /// Dynamic shared memory of a kernel with `buffers` 64-row tiles.
    fn smem(&self, buffers: usize) -> u32 {
        let pad = if self.elem == 0 { 4 } else { 8 };
        (buffers * 64 * (self.dk + pad) * self.esize()) as u32
    }

    /// Every variant the dispatcher can choose (compiled by CI for sm_80 and sm_90a).
    pub fn all() -> Vec<Variant> {
        let mut out = Vec::new();
        for elem in 0..3u32 {
            for dk in [16, 32, 64, 128, 256] {
                if elem == 0 && dk > 128 {
                    continue;
                }
                out.push(Variant { elem, dk });
            }
        }
        out
    }
}

pub fn compile_variant(v: &Variant, arch: &str) -> Result<usize, String> {
    cuda::cached_cubin("rat.cu", &cuda::source(SOURCE), &v.defines(), arch).map(|c| c.len())
}

fn launch(
    p: &Problem,
    a: &RatArgs,
    grads: Option<&RatGrads>,
    sc: &Scratch,
    cu: Option<&View>,
    ordinal: i32,
    stream: usize,
) -> Result<(), String> {
    if p.n == 0 || p.t == 0 || p.h == 0 {
        return Ok(());
    }
    let dev = cuda::device(ordinal)?;
    let variant = Variant::new(p.dtype, p.d);
    let (s3, s4) = (variant.smem(3), variant.smem(4));
    if s4 as usize > cuda::smem_limit(&dev.arch) {
        return Err(format!(
            "rat: head dim {} needs too much shared memory",
            p.d
        ));
    }
    let kernels = dev.kernels(
        "rat.cu",
        SOURCE,
        &variant.defines(),
        &[
            ("rat_states", 0),
            ("rat_fwd", s3),
            ("rat_delta", 0),
            ("rat_bwd_kv", s4),
            ("rat_bwd_q", s4),
        ],
    )?;
    let l = a.chunk;
    let tq = if l <= 64 { (64 / l) * l } else { 64 };
    let tpc = tiles_per_chunk(l);
    let addr = |t: Option<&View>| t.map_or(0, |t| t.addr());
    let mut params = RatParams {
        q: a.q.addr(),
        k: a.k.addr(),
        v: a.v.addr(),
        g: a.g.addr(),
        out: a.out.addr(),
        out_lo: addr(a.out_lo),
        dout: addr(grads.map(|g| g.dout)),
        lse: a.lse.addr(),
        ks: a.ks.addr(),
        vs: a.vs.addr(),
        kr: sc.kr.addr(),
        ve: sc.ve.addr(),
        carry_k: sc.carry_k.addr(),
        carry_v: sc.carry_v.addr(),
        delta: addr(sc.delta),
        dks: addr(sc.dks),
        dvs: addr(sc.dvs),
        dq: addr(grads.map(|g| g.dq)),
        dk: addr(grads.map(|g| g.dk)),
        dv: addr(grads.map(|g| g.dv)),
        dg: addr(grads.map(|g| g.dg)),
        cu_seqlens: cu.map_or(0, |c| c.addr()),
        sq: cuda::strides(a.q),
        sk: cuda::strides(a.k),
        sv: cuda::strides(a.v),
        sg: cuda::strides(a.g),
        so: cuda::strides(a.out),
        sdo: cuda::opt_strides(grads.map(|g| g.dout)),
        slse: cuda::strides(a.lse),
        sks: cuda::strides(a.ks),
        svs: cuda::strides(a.vs),
        sdq: cuda::opt_strides(grads.map(|g| g.dq)),
        sdk: cuda::opt_strides(grads.map(|g| g.dk)),
        sdv: cuda::opt_strides(grads.map(|g| g.dv)),
        sdg: cuda::opt_strides(grads.map(|g| g.dg)),
        srot: cuda::strides(sc.kr),
        scar: cuda::strides(sc.carry_k),
        log2_base: a.rope_theta.map_or(0.0, f64::log2),
        rope: a.rope_theta.is_some() as i32,
        t: p.t as i32,
        h: p.h as i32,
        d: p.d as i32,
        l: l as i32,
        tq: tq as i32,
        tpc: tpc as i32,
        cu_kind: cu.map_or(-1, |c| if c.dtype == DType::I64 { 1 } else { 0 }),
        g_f32: (a.g.dtype == DType::F32) as i32,
        mode: 0,
        write_states: 1,
        vec_rot: cuda::rows_aligned(sc.kr) as i32,
        vec_do: grads.map(|g| g.dout).is_some_and(cuda::rows_aligned) as i32,
        vec_q: cuda::rows_aligned(a.q) as i32,
        scale: a.scale as f32,
    };
    let (n, h) = (p.n as u32, p.h as u32);
    let max_chunks = p.t.div_ceil(l) as u32;
    let max_tiles = if l <= 64 {
        p.t.div_ceil(tq) as u32
    } else {
        max_chunks * tpc as u32
    };
    let f = |name: &str| kernels.get(name);
    // SAFETY: params mirrors RatParams; every pointer comes from a validated tensor of this
    // device whose shape bounds the kernels' accesses.
    unsafe {
        match grads {
            None => {
                dev.launch(
                    f("rat_states")?,
                    (max_chunks, h, n),
                    THREADS,
                    0,
                    stream,
                    &params,
                )?;
                dev.launch(
                    f("rat_fwd")?,
                    (max_tiles, h, n),
                    THREADS,
                    s3,
                    stream,
                    &params,
                )?;
            }
            Some(_) => {
                // rotated elem copies of the saved states (and the carries when L > 64)
                if l > 64 {
                    params.write_states = 0;
                } else {
                    params.mode = 1;
                }
                dev.launch(
                    f("rat_states")?,
                    (max_chunks, h, n),
                    THREADS,
                    0,
                    stream,
                    &params,
                )?;
                let rows = (p.t * p.h).div_ceil(4) as u32;
                dev.launch(
                    f("rat_delta")?,
                    (rows, p.b as u32, 1),
                    THREADS,
                    0,
                    stream,
                    &params,
                )?;
                let blocks = max_chunks.div_ceil(64);
                dev.launch(
                    f("rat_bwd_kv")?,
                    (blocks, h, n),
                    THREADS,
                    s4,
                    stream,
                    &params,
                )?;
                let qgrid = if l <= 64 { max_tiles } else { max_chunks };
                dev.launch(f("rat_bwd_q")?, (qgrid, h, n), THREADS, s4, stream, &params)?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Decode

/// Kernel parameters of `rat_decode`/`rat_decode_combine`, laid out exactly like
/// `RatDecodeParams` in cuda/rat.cu.
#[repr(C)]
struct RatDecodeParams {
    q: u64,
    k: u64,
    v: u64,
    g: u64,
    out: u64,
    k_run: u64,
    v_run: u64,
    ks: u64,
    vs: u64,
    partial: u64,
    sq: [i64; 2],
    sk: [i64; 2],
    sv: [i64; 2],
    sg: [i64; 2],
    so: [i64; 2],
    skr: [i64; 2],
    svr: [i64; 2],
    sks: [i64; 3],
    svs: [i64; 3],
    log2_base: f64,
    rope: i32,
    h: i32,
    d: i32,
    chunks: i32,
    fresh: i32,
    completes: i32,
    g_f32: i32,
    vec: i32,
    splits: i32,
    split_len: i32,
    scale: f32,
}

/// One-token decode step from a RAT cache (CUDA only; the CPU decodes in PyTorch).
///
/// q, k, v, g, out: `[B, 1, H, D]`; k_run, v_run: `[B, H, D]` float32 running state of the
/// current chunk, updated in place; k_states, v_states: `[B, H, capacity, D]` in q's dtype, the
/// chunk-final states rotated by their chunk index, of which the first C = seen / L are read and,
/// when the token ends its chunk, slot C is written. `partial`: `[B, H, S, D + 2]` float32
/// contiguous scratch when the states are split over S > 1 CTAs per row (None: S = 1).
#[allow(clippy::too_many_arguments)]
pub fn decode(
    q: &View,
    k: &View,
    v: &View,
    g: &View,
    out: &View,
    k_run: &View,
    v_run: &View,
    ks: &View,
    vs: &View,
    partial: Option<&View>,
    seen: i64,
    chunk: i64,
    scale: f64,
    rope_theta: Option<f64>,
    stream: usize,
) -> Result<(), PyErr> {
    let p = check(q, k, v, g, chunk, scale, rope_theta, None)?;
    let Device::Cuda(ordinal) = p.device else {
        return Err(value_error(
            "rat_decode: CUDA tensors only (the CPU decodes in PyTorch: longattn.nn.rat.rat_continue)",
        ));
    };
    if p.t != 1 {
        return Err(value_error(format!(
            "q: rat_decode takes one token per sequence ([B, 1, H, D]), got T = {}",
            p.t
        )));
    }
    if seen < 0 {
        return Err(value_error(format!(
            "seen: must be non-negative, got {seen}"
        )));
    }
    p.expect(out, "out", &p.tokens(), "[B, 1, H, D] like q", p.dtype)?;
    let run = [p.b, p.h, p.d];
    p.expect(k_run, "k_run", &run, "[B, H, D]", p.state_dtype)?;
    p.expect(v_run, "v_run", &run, "[B, H, D]", p.state_dtype)?;
    expect_rank(ks, "k_states", 4, "[B, H, capacity, D]")?;
    let capacity = ks.shape[2];
    let st = [p.b, p.h, capacity, p.d];
    p.expect(ks, "k_states", &st, "[B, H, capacity, D]", p.dtype)?;
    p.expect(
        vs,
        "v_states",
        &st,
        "[B, H, capacity, D] like k_states",
        p.dtype,
    )?;
    let (seen, l) = (seen as usize, chunk as usize);
    let chunks = seen / l;
    let completes = seen % l == l - 1;
    let needed = chunks + completes as usize;
    if needed > capacity || chunks > i32::MAX as usize {
        return Err(value_error(format!(
            "k_states: capacity {capacity} cannot hold the {needed} chunk states of this step"
        )));
    }
    let splits = match partial {
        None => 1,
        Some(part) => {
            if part.ndim() != 4 || part.shape[2] < 2 {
                return Err(value_error(format!(
                    "partial: expected [B, H, S, D + 2] with S >= 2, got shape {:?}",
                    part.shape
                )));
            }
            let s = part.shape[2];
            let ps = [p.b, p.h, s, p.d + 2];
            expect_tensor(
                part,
                "partial",
                &ps,
                "[B, H, S, D + 2]",
                DType::F32,
                p.device,
            )?;
            if !contiguous(part) {
                return Err(value_error("partial: must be contiguous"));
            }
            s
        }
    };
    if p.b == 0 || p.h == 0 {
        return Ok(());
    }
    let bh = |t: &View, head: usize| [t.strides[0] as i64, t.strides[head] as i64];
    let params = RatDecodeParams {
        q: q.addr(),
        k: k.addr(),
        v: v.addr(),
        g: g.addr(),
        out: out.addr(),
        k_run: k_run.addr(),
        v_run: v_run.addr(),
        ks: ks.addr(),
        vs: vs.addr(),
        partial: partial.map_or(0, |t| t.addr()),
        sq: bh(q, 2),
        sk: bh(k, 2),
        sv: bh(v, 2),
        sg: bh(g, 2),
        so: bh(out, 2),
        skr: bh(k_run, 1),
        svr: bh(v_run, 1),
        sks: cuda::strides(ks),
        svs: cuda::strides(vs),
        log2_base: rope_theta.map_or(0.0, f64::log2),
        rope: rope_theta.is_some() as i32,
        h: p.h as i32,
        d: p.d as i32,
        chunks: chunks as i32,
        fresh: (seen % l == 0) as i32,
        completes: completes as i32,
        g_f32: (g.dtype == DType::F32) as i32,
        vec: (cuda::rows_aligned(ks) && cuda::rows_aligned(vs)) as i32,
        splits: splits as i32,
        split_len: chunks.div_ceil(splits) as i32,
        scale: scale as f32,
    };
    decode_launch(&p, &params, ordinal, stream).map_err(value_error)
}

fn decode_launch(
    p: &Problem,
    params: &RatDecodeParams,
    ordinal: i32,
    stream: usize,
) -> Result<(), String> {
    let dev = cuda::device(ordinal)?;
    let variant = Variant::new(p.dtype, p.d);
    let kernels = dev.kernels(
        "rat.cu",
        SOURCE,
        &variant.defines(),
        &[("rat_decode", 0), ("rat_decode_combine", 0)],
    )?;
    let (b, h, splits) = (p.b as u32, p.h as u32, params.splits as u32);
    // SAFETY: params mirrors RatDecodeParams; every pointer comes from a validated tensor of
    // this device whose shape bounds the kernels' accesses (slot C < capacity when written).
    unsafe {
        dev.launch(
            kernels.get("rat_decode")?,
            (splits, h, b),
            THREADS,
            0,
            stream,
            params,
        )?;
        if splits > 1 {
            dev.launch(
                kernels.get("rat_decode_combine")?,
                (h, b, 1),
                THREADS,
                0,
                stream,
                params,
            )?;
        }
    }
    Ok(())
}
